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
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from tuneforge.errors import CheckpointError
from tuneforge.engine.run import say
from tuneforge.engine.runfolder import write_text

__all__ = [
    "save_checkpoint", "find_latest", "resolve_checkpoint", "open_checkpoint", "open_intact", "open_latest", "read_state", "load_weights",
    "load_training_state", "clean_stale", "list_checkpoints", "damage", "set_aside", "remove_step",
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
    write_text(out / "latest", final.name + "\n")
    if keep_last:
        for old in list_checkpoints(out)[:-keep_last]:
            if old != final:
                remove_step(old)
    return final


def remove_step(folder: Path) -> None:
    """Delete a checkpoint folder of a run: renamed out of the ``step-*`` names first (one atomic step), so a kill
    during the deletion leaves a ``.old-step-*`` folder that :func:`clean_stale` finishes, never half a checkpoint
    that looks whole. Only a real folder named like a step is touched."""
    if not STEP_DIR.match(folder.name) or folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder of this run; refusing to delete it")
    aside = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


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
    """Complete checkpoints in ``out``, oldest first (a folder only gets its final name once complete). Links are
    not checkpoints of this run: a step folder is always a real folder inside it."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if STEP_DIR.match(p.name) and not p.is_symlink() and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def clean_stale(out: Path) -> list[Path]:
    """Remove what a process killed while saving or rotating left: temporary ``.tmp-step-*`` / ``.old-step-*``
    folders, and ``step-*`` folders without ``state.json`` (a complete checkpoint always has one, as it is renamed
    into place whole). Returns what it removed."""
    removed = []
    if out.is_dir():
        for p in out.iterdir():
            if p.is_symlink() or not p.is_dir():
                continue
            stale = p.name.startswith((".tmp-step-", ".old-step-"))
            if stale or (STEP_DIR.match(p.name) and not (p / STATE_FILE).exists()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def damage(ckpt: Path) -> str | None:
    """What makes checkpoint ``ckpt`` unusable (a file missing, cut short or not parseable), or None when every
    file reads. Only headers are read (safetensors checks that a file covers every tensor it lists), so this is
    cheap even for a large model."""
    return _examine(ckpt)[1]


def _examine(ckpt: Path) -> tuple[dict | None, str | None]:
    """(the parsed ``state.json``, None) for an intact checkpoint, else (None, what is wrong): :func:`damage`,
    keeping the state it parsed so that whoever goes on to use the checkpoint need not read it again."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{ckpt / STATE_FILE} is unreadable ({exc})"
    if not isinstance(state, dict):
        return None, f"{ckpt / STATE_FILE} is not a JSON object"
    for key in ("step", "epoch", "batch_in_epoch"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            return None, f"{ckpt / STATE_FILE} has no valid '{key}' (got {state.get(key)!r})"
    for required in (MODEL_FILE, OPTIM_FILE):
        if not (ckpt / required).is_file():
            return None, f"{ckpt / required} is missing"
    for f in sorted(ckpt.rglob("*")):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):
                    pass
            elif f.suffix == ".json" and f.name != STATE_FILE:
                json.loads(f.read_text(encoding="utf-8"))
        except Exception as exc:  # safetensors raises its own error type; any failure means unusable
            return None, f"{f} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return state, None


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the ``step-*`` names (kept for inspection, never deleted)."""
    target = ckpt.with_name(f"{ckpt.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(ckpt, target)
    return target


def _pointer(out: Path) -> Path | None:
    """The checkpoint ``out/latest`` names, or None when there is no usable pointer. A pointer that leads out of
    the run folder is refused: it would continue another run's weights."""
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if STEP_DIR.match(name):
        candidate = out / name
        if candidate.is_symlink():
            raise CheckpointError(f"{candidate} is a symbolic link: a run's checkpoints live in its own folder; "
                                  "remove the link, or point --resume at the checkpoint it leads to")
        return candidate
    if "/" in name or "\\" in name or ".." in name:
        raise CheckpointError(f"{pointer} points at {name!r}, outside the run folder {out}: refused, as it would "
                              f"continue another run's weights. Write a step folder name of {out} into it (or "
                              "delete it to use the newest checkpoint), or pass that checkpoint to --resume")
    return None  # garbage: the folder's own checkpoints are listed instead


def find_latest(out: Path, *, on_damaged: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest intact checkpoint of a run folder (``latest`` first, then the ``step-*`` folders newest first),
    or None. Damaged ones (see :func:`damage`) are passed over and reported to ``on_damaged(folder, problem)``."""
    found = _latest(out, on_damaged)
    return found[0] if found is not None else None


def _latest(out: Path, on_damaged: Callable[[Path, str], None] | None) -> tuple[Path, dict] | None:
    """:func:`find_latest`, with the state.json it parsed while checking the checkpoint."""
    candidates = [p for p in [_pointer(out)] if p is not None and (p / STATE_FILE).is_file()]
    candidates += [p for p in reversed(list_checkpoints(out)) if p not in candidates]
    for candidate in candidates:
        state, problem = _examine(candidate)
        if problem is None:
            return candidate, state
        if on_damaged is not None:
            on_damaged(candidate, problem)
    return None


def _warn(folder: Path, problem: str) -> None:
    say(f"passing over the damaged checkpoint {folder.name}: {problem}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its newest intact checkpoint)."""
    return _resolve(path)[0]


def open_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(the checkpoint folder, its parsed state.json) from a checkpoint or run folder, reading state.json once:
    what rebuilding a saved model needs (pass the state on to :func:`load_weights`)."""
    found, state = _resolve(path)
    return found, read_state(found) if state is None else state


def open_intact(path: str | Path) -> tuple[Path, dict]:
    """:func:`open_checkpoint` for a checkpoint to continue from: a damaged one is refused (a run folder's newest
    intact one is taken). state.json is read once."""
    found, state = _resolve(path)
    if state is None:
        state, problem = _examine(found)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {found}: {problem}; resume from an older checkpoint of the "
                                  "run (--resume auto passes over damaged ones)")
    return found, state


def open_latest(out: Path, *, on_damaged: Callable[[Path, str], None] | None = None) -> tuple[Path, dict] | None:
    """:func:`find_latest` with the checkpoint's state.json as it parsed it while checking it: (folder, state)."""
    return _latest(out, on_damaged)


def _resolve(path: str | Path) -> tuple[Path, dict | None]:
    """:func:`resolve_checkpoint`, with the state found in a run folder (None for a checkpoint folder given
    directly, which is taken as it is, unread)."""
    path = Path(path)
    if (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path, None
    if path.is_dir():
        latest = _latest(path, _warn)
        if latest is not None:
            return latest
        raise CheckpointError(f"{path}: no complete checkpoint (step-XXXXXXXX/ with {STATE_FILE}) in this folder")
    raise CheckpointError(f"{path}: no such checkpoint or run folder")


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt / STATE_FILE}: not a JSON object; is this a tuneforge checkpoint?")
    return state


def load_weights(ckpt: Path, model: torch.nn.Module, *, strict: bool = True, state: dict | None = None) -> None:
    """Load ``model.safetensors`` into ``model``; a mismatch says which tensors differ. Weights the checkpoint
    left to the model's folder must already be the folder's in ``model`` (checked against the folder's files).
    ``state``: the checkpoint's state.json as the caller already read it (else it is read here)."""
    referenced = (read_state(ckpt) if state is None else state).get("folder_weights")
    try:
        if referenced:
            missing, unexpected = _load_beside_folder(ckpt, model, referenced)
        else:
            missing, unexpected = load_model(model, str(ckpt / MODEL_FILE), strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{ckpt / MODEL_FILE} does not fit this model: {str(exc).splitlines()[0]}") from None
    except (OSError, SafetensorError) as exc:  # missing, cut short, not safetensors
        raise CheckpointError(f"{ckpt / MODEL_FILE}: unreadable ({exc}); resume from an older checkpoint of the "
                              "run (--resume auto passes over damaged ones)") from None
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


def load_training_state(ckpt: Path, *, state: dict | None = None) -> tuple[dict, dict | None, dict[str, torch.Tensor]]:
    """What ``--resume`` restores besides the weights: (the engine state from ``state.json``, the optimizer's
    state_dict or None, the RNG states by name). ``state``: the checkpoint's state.json as :func:`open_intact` or
    :func:`open_latest` parsed it (else the checkpoint is checked and read here)."""
    if state is None:
        ckpt, state = open_intact(ckpt)
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
