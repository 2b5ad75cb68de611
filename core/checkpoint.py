"""Checkpoints: ``step-XXXXXXXX/`` folders of safetensors and JSON, never pickle, written atomically.

A checkpoint is built in a hidden temporary folder beside its final place, every file flushed to disk, and
then renamed into place in one step; ``latest`` (a one-line text file) is replaced the same way afterwards.
So a kill at any moment leaves either the old latest checkpoint or the new one, never half of one.

Layout of one checkpoint::

    step-00000300/
        model.safetensors      the model's weights (tied weights stored once); weights that are still exactly
                               those of a Hugging Face model folder are left out and named in state.json
                               (``folder_weights``), so a LoRA checkpoint of a 7B model holds the LoRA, not 7B
        optimizer.safetensors  optimizer tensors (AdamW moments...), plus the torch RNG state
        state.json             step, epoch, position in the epoch, optimizer scalars, configs
        <plugin files>         whatever the plugins wrote in tuneforge_save
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import CheckpointError

__all__ = [
    "save_checkpoint", "find_latest", "resolve_checkpoint", "read_state", "load_weights",
    "load_training_state", "clean_stale", "list_checkpoints", "atomic_write_text",
]

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_split(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (``state.<param>.<key>``) plus JSON-able rest, so no pickle is needed."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict | None,
    state: dict,
    write_plugins: Callable[[Path], None] | None = None,
    keep_last: int | None = None,
    *,
    folder: tuple[set[str], dict] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out/step-{step:08d}/`` atomically and point ``out/latest`` at it.

    :param optimizer: the optimizer, or its ``state_dict()`` (full tensors: FSDP gathers them first).
    :param state: JSON-able engine state (step, epoch, configs...).
    :param write_plugins: called with the temporary folder so plugins can add their files.
    :param keep_last: delete older ``step-*`` folders beyond this many, once the new one is in place.
    :param folder: ``(names, source)`` of the weights still the model folder's, when ``model.folder_weights()``
        cannot tell any more (FSDP replaced the parameters it tracks by identity; they were named before).
    :param rng: RNG states to store (default: this process's torch RNG as ``rng.torch``).
    :return: the final folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step-{step:08d}"
    tmp = out / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {**state, **_save_weights(model, tmp / MODEL_FILE, folder)}
        tensors = dict(rng) if rng is not None else {"rng.torch": torch.get_rng_state()}
        meta = {}
        if optimizer is not None:
            opt_tensors, meta = _optimizer_split(optimizer)
            tensors.update(opt_tensors)
        save_file(tensors, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": meta}, indent=2, default=str))
        if write_plugins is not None:
            write_plugins(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): move the old one aside, then swap
            old = out / f".old-step-{step:08d}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(out / "latest", final.name + "\n")
    if keep_last:
        for old in list_checkpoints(out)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _save_weights(model: torch.nn.Module, path: Path, folder: tuple[set[str], dict] | None = None) -> dict:
    """Write the model's weights; those still its source folder's (``folder``, else ``model.folder_weights()``:
    a Hugging Face model's frozen base) are left out and recorded instead. Returns what goes into state.json."""
    folder_weights = getattr(model, "folder_weights", None)
    if folder is None:
        folder = folder_weights() if folder_weights is not None else (set(), None)
    skip, source = folder
    if not skip:
        save_model(model, str(path))
        return {}
    tensors = _dedup({name: t.detach() for name, t in model.state_dict().items() if name not in skip})
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {"folder_weights": {**source, "names": sorted(skip)}}


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first (a folder only gets its final name once complete)."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def clean_stale(out: Path) -> None:
    """Remove temporary folders left by a process killed while saving."""
    if out.is_dir():
        for p in out.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-step-") or p.name.startswith(".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


def find_latest(out: Path) -> Path | None:
    """The latest complete checkpoint of a run folder, or None."""
    pointer = out / "latest"
    if pointer.is_file():
        candidate = out / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    found = list_checkpoints(out)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
        raise CheckpointError(f"{path}: no complete checkpoint (step-XXXXXXXX/ with {STATE_FILE}) in this folder")
    raise CheckpointError(f"{path}: no such checkpoint or run folder")


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable ({exc})") from None


def load_weights(ckpt: Path, model: torch.nn.Module, *, strict: bool = True) -> None:
    """Load ``model.safetensors`` into ``model``; a mismatch says which tensors differ. Weights the checkpoint
    left to the model's folder must already be the folder's in ``model`` (checked against the folder's files)."""
    referenced = read_state(ckpt).get("folder_weights")
    try:
        if referenced:
            missing, unexpected = _load_beside_folder(ckpt, model, referenced)
        else:
            missing, unexpected = load_model(model, str(ckpt / MODEL_FILE), strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{ckpt / MODEL_FILE} does not fit this model: {str(exc).splitlines()[0]}") from None
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{ckpt / MODEL_FILE} does not fit this model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}. Were the same mechanisms (and options) used when it was saved?"
        )


def _load_beside_folder(ckpt: Path, model: torch.nn.Module, referenced: dict) -> tuple[list, list]:
    check = getattr(model, "check_folder_weights", None)
    if check is None:
        raise CheckpointError(f"{ckpt} keeps its base weights in the model folder {referenced.get('folder')}; load it "
                              "with tuneforge.load_model, which builds the model from that folder")
    check(referenced, where=str(ckpt))  # the folder's files as they were, and these weights still the folder's
    loaded = load_file(str(ckpt / MODEL_FILE))
    result = model.load_state_dict(loaded, strict=False)
    model.loaded_over_folder(loaded)  # these now hold the checkpoint's values, not the folder's
    by_storage = {}  # tied names: one stored, the others share its tensor
    for name, t in model.state_dict().items():
        by_storage.setdefault(t.data_ptr(), []).append(name)
    covered = set(referenced["names"]) | {n for names in by_storage.values() if set(names) & loaded.keys() for n in names}
    return [n for n in result.missing_keys if n not in covered], list(result.unexpected_keys)


def load_training_state(ckpt: Path) -> tuple[dict, dict | None, dict[str, torch.Tensor]]:
    """What ``--resume`` restores besides the weights: (the engine state from ``state.json``, the optimizer's
    state_dict or None, the RNG states by name)."""
    state = read_state(ckpt)
    tensors = load_file(str(ckpt / OPTIM_FILE))
    rng = {k: tensors.pop(k) for k in list(tensors) if k.startswith("rng.")}
    optimizer = _optimizer_join(tensors, state["optimizer"]) if state.get("optimizer") else None
    return state, optimizer, rng


def _dedup(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per shared tensor, as safetensors' save_model stores tied weights."""
    out, seen = {}, set()
    for name, t in tensors.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out
