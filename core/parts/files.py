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
import math
from numbers import Real
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.parts.modules import base_fingerprint
from tuneforge.errors import ConfigError
from tuneforge.common.names import check_name, is_name, replace_folder
from tuneforge.common.version import __version__

__all__ = ["FORMAT", "VERSION", "MANIFEST", "TENSORS", "WHOLE", "NUMBER", "one_of", "save_part", "read_part", "is_part",
           "fingerprint_note"]

FORMAT = "tuneforge.adapter"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "adapter.safetensors"


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


WHOLE = (_whole, "a whole number of at least 1")
NUMBER = (_number, "a number")


def one_of(values) -> tuple:
    """A point-field check: the value is one of ``values`` (strings)."""
    return (lambda v: isinstance(v, str) and v in values, f"one of {', '.join(values)}")


def is_part(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file() and (Path(path) / TENSORS).is_file()


def save_part(folder: Path, *, mechanism: str, name: str, tensors: dict[str, torch.Tensor], points: dict,
              options: dict, model: torch.nn.Module) -> Path:
    """Write one part's folder (replacing an older part folder there, never anything else); returns its path.

    ``folder`` is the caller's (``<checkpoint>/<subdir>/<name>``, built with :func:`tuneforge.common.names.inside`);
    ``name`` must be a valid name, as it will be read back as one.
    """
    folder = Path(folder)
    check_name(name, what=f"{mechanism} part name", where=f"saving {folder}")
    manifest = {
        "format": FORMAT, "version": VERSION, "mechanism": mechanism, "name": name, "options": options,
        "points": points, "parameters": int(sum(t.numel() for t in tensors.values())),
        "base": {"fingerprint": base_fingerprint(model), "config": _config(model)},
        "written_by": f"tuneforge {__version__}",
    }

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS),
                  metadata={"format": FORMAT, "mechanism": mechanism, "name": name})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return replace_folder(folder, fill, ours=is_part,
                          refusal=f"{mechanism}: {folder} exists and is not a saved part; nothing was written. "
                                  "Save parts into a checkpoint folder tuneforge writes")


def _config(model) -> dict | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def read_part(folder: Path, *, mechanism: str, point_fields: dict | None = None
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a part folder written by :func:`save_part` for ``mechanism``; a :class:`ConfigError`
    naming the file and the field for anything malformed, before anything is installed.

    ``point_fields`` is what each insertion point of the manifest must say, from the mechanism
    (:attr:`tuneforge.parts.mechanism.PartMechanism.point_fields`): field -> (test, what it must be), e.g.
    ``{"rank": WHOLE, "scaling": NUMBER, "placement": one_of(["serial", "parallel"])}``. Checked when a part is
    read, so a hand-edited or foreign manifest is one clear error before anything is installed, never a KeyError
    or a half-installed part."""
    folder = Path(folder)
    if not is_part(folder):
        raise ConfigError(f"{mechanism}: {folder} is not a saved {mechanism} (expected {MANIFEST} and {TENSORS})")
    where = folder / MANIFEST
    try:
        manifest = json.loads(where.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{mechanism}: {where}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{mechanism}: {where} cannot be read ({exc})") from None
    _check_manifest(manifest, mechanism, folder, point_fields or {})
    try:
        with safe_open(str(folder / TENSORS), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ConfigError(f"{mechanism}: {folder / TENSORS} is not a readable safetensors file ({exc}); save "
                          "the part again") from None
    return manifest, tensors


def _check_manifest(manifest, mechanism: str, folder: Path, fields: dict) -> None:
    where = folder / MANIFEST
    redo = f"it was not written by tuneforge or was edited; save the {mechanism} again"
    if not isinstance(manifest, dict):
        raise ConfigError(f"{mechanism}: {where} holds a JSON {type(manifest).__name__}, not an object; {redo}")
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{mechanism}: {where} is not a tuneforge adapter manifest "
                          f"(format {manifest.get('format')!r})")
    if manifest.get("mechanism") != mechanism:
        other = manifest.get("mechanism")
        hint = f"; load it with {other}:load={folder}" if is_name(other) else ""
        raise ConfigError(f"{mechanism}: {folder} holds a '{other}', not a {mechanism}{hint}")
    version = manifest.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"{mechanism}: {where}: field 'version' is {version!r}, not a whole number; {redo}")
    if version > VERSION:
        raise ConfigError(f"{mechanism}: {folder} was written by a newer tuneforge (format version "
                          f"{version}, this one reads {VERSION}); upgrade tuneforge")
    if "name" not in manifest:
        raise ConfigError(f"{mechanism}: {where} has no field 'name'; {redo}")
    check_name(manifest["name"], what=f"field 'name' ({mechanism} part name)", where=str(where))
    points = manifest.get("points")
    if not isinstance(points, dict) or not points:
        raise ConfigError(f"{mechanism}: {where}: field 'points' is {points!r}, not an object mapping each module "
                          f"path to its sizes; {redo}")
    for path, point in points.items():
        if not isinstance(point, dict):
            raise ConfigError(f"{mechanism}: {where}: points[{path!r}] is {point!r}, not an object; {redo}")
        for key, (valid, said) in fields.items():
            value = point.get(key)
            if not valid(value):
                raise ConfigError(f"{mechanism}: {where}: points[{path!r}].{key} is {value!r}, not {said}; {redo}")


def fingerprint_note(manifest: dict, model, where: Path) -> str | None:
    """A note when the part was trained on a base of other shapes (that it nevertheless fits), else None."""
    base = manifest.get("base")
    theirs = base.get("fingerprint") if isinstance(base, dict) else None
    if theirs and theirs != base_fingerprint(model):
        return (f"{manifest.get('mechanism')} '{manifest.get('name')}' from {where} was trained on a base of other "
                "shapes (its insertion points fit this one); check it is the base you meant")
    return None
