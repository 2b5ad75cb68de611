"""IA³ vectors on disk: a small folder of safetensors and JSON, never pickle, without the base model.

::

    ia3/
        ia3.safetensors   the vectors, under their names in the model: blocks.0.attn.k.ia3.k (C,), ...
        manifest.json     format, version, the points (layer path -> role, side, features), the options they were
                          made with, the base model's family and config, and what wrote them

Every checkpoint of a run with ``ia3`` holds this folder, so ``ia3:load=RUN`` (a run folder, a checkpoint or
the folder itself) brings the vectors onto another run. The tensors' names are the truth: where each goes is
worked out again on the model they are loaded onto, and checked (:func:`tuneforge_ia3.placement.points_for`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.sdk import MODEL_FILE, CheckpointError, ConfigError, family_of, replace_folder, resolve_checkpoint

from .placement import ia3_layers

__all__ = ["FORMAT", "VERSION", "FOLDER", "TENSORS", "MANIFEST", "ia3_state", "save_ia3", "read_ia3", "find_ia3",
           "saved_shapes"]

FORMAT = "tuneforge-ia3"
VERSION = 1
FOLDER = "ia3"  # inside a checkpoint: named after the plugin, as tuneforge_save asks
TENSORS = "ia3.safetensors"
MANIFEST = "manifest.json"


def _version() -> str:
    from . import __version__
    return __version__


def ia3_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(vectors by state-dict name, points: layer path -> side, in/out and each role's features) of ``model``."""
    tensors, points = {}, {}
    for path, layer in ia3_layers(model):
        for role, vector in layer.ia3.items():
            tensors[f"{path}.ia3.{role}"] = vector
        points[path] = {"side": layer.side, "in": layer.in_features, "out": layer.out_features,
                        "roles": {r: list(span) for r, span in layer.spans.items()}}
    return tensors, points


def save_ia3(model: torch.nn.Module, folder: str | Path, *, options: dict | None = None) -> Path:
    """Write every IA³ vector of ``model`` to ``folder`` (replaced whole: written beside it, then renamed).

    An existing ``folder`` is replaced only when it is an IA³ folder (or empty): a path that names anything else
    is refused with nothing changed, so a mistaken path never deletes someone's files."""
    tensors, points = ia3_state(model)
    if not tensors:
        raise ConfigError("ia3: this model holds no IA³ vectors to save")
    cfg = getattr(model, "config", None)
    manifest = {
        "format": FORMAT, "version": VERSION, "mechanism": "ia3", "points": points, "options": options or {},
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "base": {"family": family_of(model).name, "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None},
        "written_by": f"tuneforge-ia3 {_version()}",
    }
    folder = Path(folder)

    def fill(tmp: Path) -> None:  # a fresh folder beside ``folder``, made by replace_folder
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS),
                  metadata={"format": FORMAT, "version": str(VERSION)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return replace_folder(folder, fill, ours=_is_ia3, owner="ia3",
                          refusal=f"ia3: {folder} exists and is not an IA³ folder: nothing was written; give a new "
                                  "or empty folder, or an earlier IA³ folder to replace")


def _is_ia3(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / TENSORS).is_file()


def find_ia3(spec: str | Path) -> Path:
    """The IA³ folder at ``spec``: the folder itself, a checkpoint holding ``ia3/``, or a run folder (its latest
    checkpoint)."""
    path = Path(spec)
    if _is_ia3(path):
        return path
    if _is_ia3(path / FOLDER):
        return path / FOLDER
    try:
        found = resolve_checkpoint(path) / FOLDER
    except CheckpointError:
        raise ConfigError(f"ia3: load={spec} is neither an IA³ folder ({MANIFEST} + {TENSORS}) nor a checkpoint or "
                          f"run folder with {FOLDER}/") from None
    if not _is_ia3(found):
        raise ConfigError(f"ia3: {found.parent} holds no {FOLDER}/ folder; was that run an ia3 run?")
    return found


def read_ia3(spec: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(vectors by state-dict name, manifest, the folder) of the IA³ folder at ``spec`` (see :func:`find_ia3`)."""
    folder = find_ia3(spec)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ia3: {folder / MANIFEST}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        said = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise ConfigError(f"ia3: {folder / MANIFEST} is not an IA³ manifest (format {said!r})")
    version = manifest.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"ia3: {folder / MANIFEST}: field 'version' is {version!r}, not a whole number; save the "
                          "IA³ vectors again")
    if version > VERSION:
        raise ConfigError(f"ia3: {folder} was written by a newer tuneforge-ia3 (format version "
                          f"{manifest['version']}, this one reads {VERSION}); upgrade tuneforge-ia3")
    try:
        with safe_open(str(folder / TENSORS), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ConfigError(f"ia3: {folder / TENSORS} is not a readable safetensors file ({exc})") from None
    return tensors, manifest, folder


def saved_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint's model file (read from its header, no tensor loaded)."""
    with safe_open(str(Path(checkpoint) / MODEL_FILE), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
