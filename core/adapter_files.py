"""An adapter or LoRA on disk: a small folder of safetensors and a JSON manifest, without the base model.

::

    sentiment/
        adapter.safetensors   the part's tensors, named by insertion point: blocks.0.attn.q.lora_a, ...
        manifest.json         format, version, mechanism, name, options, insertion points (path -> sizes),
                              the base model's fingerprint and the shapes the points need

A folder is written under a temporary name and renamed into place, so a reader never sees half of one. Loading
checks every insertion point against the model first (the module exists, the sizes fit) and refuses a base it
does not fit with what differs; a base of other shapes that still fits (another head, say) is only noted.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import base_fingerprint
from .errors import ConfigError

__all__ = ["FORMAT", "VERSION", "MANIFEST", "TENSORS", "save_part", "read_part", "is_part", "fingerprint_note"]

FORMAT = "tuneforge.adapter"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "adapter.safetensors"


def is_part(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file() and (Path(path) / TENSORS).is_file()


def save_part(folder: Path, *, mechanism: str, name: str, tensors: dict[str, torch.Tensor], points: dict,
              options: dict, model: torch.nn.Module) -> Path:
    """Write one part's folder (replacing an older one of the same name); returns its path."""
    from . import __version__

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT, "version": VERSION, "mechanism": mechanism, "name": name, "options": options,
        "points": points, "parameters": int(sum(t.numel() for t in tensors.values())),
        "base": {"fingerprint": base_fingerprint(model), "config": _config(model)},
        "written_by": f"tuneforge {__version__}",
    }
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS),
              metadata={"format": FORMAT, "mechanism": mechanism, "name": name})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _config(model) -> dict | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def read_part(folder: Path, *, mechanism: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a part folder written by :func:`save_part` for ``mechanism``; clear errors else."""
    folder = Path(folder)
    if not is_part(folder):
        raise ConfigError(f"{mechanism}: {folder} is not a saved {mechanism} (expected {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{mechanism}: {folder / MANIFEST}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{mechanism}: {folder / MANIFEST} is not a tuneforge adapter manifest "
                          f"(format {manifest.get('format')!r})")
    if manifest.get("mechanism") != mechanism:
        raise ConfigError(f"{mechanism}: {folder} holds a '{manifest.get('mechanism')}', not a {mechanism}; load it "
                          f"with {manifest.get('mechanism')}:load={folder}")
    if int(manifest.get("version", 0)) > VERSION:
        raise ConfigError(f"{mechanism}: {folder} was written by a newer tuneforge (format version "
                          f"{manifest['version']}, this one reads {VERSION}); upgrade tuneforge")
    with safe_open(str(folder / TENSORS), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return manifest, tensors


def fingerprint_note(manifest: dict, model, where: Path) -> str | None:
    """A note when the part was trained on a base of other shapes (that it nevertheless fits), else None."""
    theirs = manifest.get("base", {}).get("fingerprint")
    if theirs and theirs != base_fingerprint(model):
        return (f"{manifest.get('mechanism')} '{manifest.get('name')}' from {where} was trained on a base of other "
                "shapes (its insertion points fit this one); check it is the base you meant")
    return None
