"""LoRA in the layout of Hugging Face PEFT, so adapters move between ecosystems.

A PEFT LoRA folder holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``target_modules``...) and ``adapter_model.safetensors`` with, for each adapted linear layer at module path P,
``base_model.model.P.lora_A.weight`` (r, in) and ``base_model.model.P.lora_B.weight`` (out, r); the update is
``(lora_alpha / r) * B A`` (``/ sqrt(r)`` with ``use_rslora``). Per-layer ranks and alphas go to
``rank_pattern`` / ``alpha_pattern``. Export writes exactly that; import also accepts keys that keep an adapter
name (``lora_A.default.weight``) or lack the ``base_model.model.`` prefix.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.sdk import ConfigError, FAMILIES, is_part, layer_of, read_part, resolve_checkpoint, write_export

from .layer import POINT_FIELDS, lora_layers, lora_state

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "is_peft", "read_peft", "write_peft", "export_peft"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def is_peft(path: Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file()


def _pattern_value(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def _config_error(folder: Path, field: str, value, want: str) -> ConfigError:
    return ConfigError(f"lora: {folder / PEFT_CONFIG}: field '{field}' is {value!r}; it must be {want} (fix the "
                       "file, or export the adapter again with PEFT)")


def _number(config: dict, folder: Path, field: str, default, *, low: float, high: float | None = None,
            none: float | None = None):
    value = config.get(field, default)
    if value is None and none is not None:  # PEFT writes null for "no dropout"
        value = none
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low \
            or (high is not None and value >= high):
        want = f"a number of at least {low}" + (f" and below {high}" if high is not None else "")
        raise _config_error(folder, field, value, want)
    return value


def _rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _read_config(folder: Path) -> dict:
    """``adapter_config.json``, every field tuneforge uses checked: a :class:`ConfigError` naming the field."""
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"lora: {folder / PEFT_CONFIG}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"lora: {folder / PEFT_CONFIG} cannot be read ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"lora: {folder / PEFT_CONFIG} holds a JSON {type(config).__name__}, not an object; it is "
                          "not a PEFT adapter config")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ConfigError(f"lora: {folder} is a PEFT '{config.get('peft_type')}' adapter; only LoRA can be imported")
    if config.get("use_dora"):
        raise ConfigError(f"lora: {folder} is a DoRA adapter (use_dora=true); tuneforge imports plain LoRA only")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"lora: {folder} trains biases (bias={config['bias']!r}); tuneforge imports bias='none' only")
    if not _rank(config.get("r")):
        raise _config_error(folder, "r", config.get("r"), "the rank: a whole number of at least 1")
    _number(config, folder, "lora_alpha", 8, low=0)
    _number(config, folder, "lora_dropout", 0.0, low=0, high=1, none=0.0)
    if not isinstance(config.get("use_rslora", False), bool):
        raise _config_error(folder, "use_rslora", config["use_rslora"], "true or false")
    for field, valid, want in (("rank_pattern", _rank, "whole numbers of at least 1"),
                               ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                and math.isfinite(v), "numbers")):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
            raise _config_error(folder, field, config[field], f"an object of module name patterns to {want}")
        for key in patterns:
            try:
                re.compile(key)
            except re.error as exc:
                raise _config_error(folder, f"{field}[{key!r}]", key, f"a module name pattern ({exc})") from None
    return config


def read_peft(folder: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(name, points, tensors) of a PEFT LoRA folder, in tuneforge's own form (see ``plugins/lora.py``).

    The name is the folder's own; callers that make a folder of it check it (:func:`tuneforge.common.names.check_name`).
    Nothing is changed anywhere when the folder is malformed: the :class:`ConfigError` names file and field.
    """
    folder = Path(folder)
    config = _read_config(folder)
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        pickled = " (only adapter_model.bin, a pickle: convert it to safetensors first)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise ConfigError(f"lora: {folder} has no {PEFT_WEIGHTS}{pickled}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                m = _KEY.match(key)
                if m is None:
                    raise ConfigError(f"lora: {weights} holds '{key}', which is not a LoRA A/B weight; tuneforge "
                                      "imports LoRA weights only (no modules_to_save or embeddings)")
                pairs.setdefault(m["path"], {})[m["ab"]] = fh.get_tensor(key)
    except ConfigError:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ConfigError(f"lora: {weights} is not a readable safetensors file ({exc})") from None
    alpha, rslora = float(config.get("lora_alpha", 8)), config.get("use_rslora", False)
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    points, tensors = {}, {}
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"lora: {weights}: {path} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise ConfigError(f"lora: {weights}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}; LoRA "
                              "weights are matrices (A: (r, in), B: (out, r))")
        r = a.size(0)
        if b.size(1) != r:
            raise ConfigError(f"lora: {weights}: {path} has A of rank {r} and B of rank {b.size(1)}")
        said = _pattern_value(config.get("rank_pattern"), path, config["r"])
        if said != r:
            raise ConfigError(f"lora: {folder / PEFT_CONFIG} gives {path} rank {said} (field 'r' or "
                              f"'rank_pattern'), but its weights in {weights} have rank {r}; fix the config")
        layer_alpha = float(_pattern_value(config.get("alpha_pattern"), path, alpha))
        scaling = layer_alpha / (math.sqrt(r) if rslora else r)
        points[path] = {"in": a.size(1), "out": b.size(0), "rank": r, "scaling": scaling, "dropout": dropout}
        tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = a, b
    if not points:
        raise ConfigError(f"lora: {weights} holds no LoRA weights")
    return folder.resolve().name, points, tensors


def write_peft(points: dict, tensors: dict[str, torch.Tensor], out: Path, *, depth: int | None = None,
               base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False,
               force: bool = False) -> Path:
    """Write a PEFT LoRA folder from tuneforge's (points, tensors); atomic like every tuneforge folder.

    ``out`` is replaced as :func:`tuneforge.common.names.write_export` says: when it is empty or an earlier tuneforge
    export, or with ``force``; any other folder is refused with nothing changed, and so is a file.

    Module paths are the model's own, so a LoRA trained on a Hugging Face model gets the tensor names PEFT
    writes for that architecture (``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` for GPT-2).
    ``fan_in_fan_out`` is PEFT's flag for layers stored (in, out), GPT-2's ``Conv1D``: the LoRA tensors are the
    same either way (A (r, in), B (out, r)); PEFT needs the flag to merge them into such a weight.

    ``target_modules`` lists paths inside a block (``["attn.q", "attn.v"]``) when those are adapted in every one of
    the model's ``depth`` blocks, and full module paths otherwise. PEFT matches a target as a suffix of a module
    path; a bare leaf name would be too wide where two sub-layers share it (GPT-2's ``attn.c_proj`` and
    ``mlp.c_proj``).
    """
    out = Path(out)
    ranks = {p: v["rank"] for p, v in points.items()}
    alphas = {p: v["scaling"] * v["rank"] for p, v in points.items()}
    common = lambda d: max(set(d.values()), key=list(d.values()).count)  # noqa: E731  the defaults: most common
    r, alpha = common(ranks), common(alphas)
    layers_of_leaf: dict[str, set] = {}
    for path in points:
        layers_of_leaf.setdefault(".".join(path.split(".")[-2:]), set()).add(layer_of(path))
    every = set(range(depth)) if depth else None
    by_leaf = every is not None and all(v == every for v in layers_of_leaf.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": max((v.get("dropout", 0.0) for v in points.values()), default=0),
        "target_modules": sorted(layers_of_leaf) if by_leaf else sorted(points),
        "bias": "none", "fan_in_fan_out": bool(fan_in_fan_out), "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
    }
    weights = {}
    for path in points:
        weights[f"{_PREFIX}{path}.lora_A.weight"] = tensors[f"{path}.lora_a"].detach().cpu().contiguous()
        weights[f"{_PREFIX}{path}.lora_B.weight"] = tensors[f"{path}.lora_b"].detach().cpu().contiguous()

    def fill(tmp: Path) -> None:
        save_file(weights, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_export(out, fill, command="export-peft", force=force)


def export_peft(source, out: str | Path, *, name: str | None = None,
                base_model_name_or_path: str | None = None, force: bool = False) -> Path:
    """Write LoRA ``name`` in PEFT's layout to folder ``out`` (replaced only as :func:`write_peft` says).

    ``source``: a model holding the LoRA, a saved LoRA folder (``lora/<name>``), or a checkpoint or run folder
    (its ``lora/<name>``). ``name`` may be left out when there is only one.
    """
    if isinstance(source, torch.nn.Module):
        held = sorted({n for _, m in lora_layers(source) for n in m.task_names()})
        tensors, points = lora_state(source, _pick(name, held, "this model"))
        depth = len(source.blocks) if hasattr(source, "blocks") else None
        config = source.config.to_dict() if hasattr(getattr(source, "config", None), "to_dict") else {}
    else:
        folder = _lora_folder(Path(source), name)
        manifest, tensors = read_part(folder, mechanism="lora", point_fields=POINT_FIELDS)
        points = manifest["points"]
        base = manifest.get("base")
        config = base.get("config") if isinstance(base, dict) else None
        config = config if isinstance(config, dict) else {}
        depth = config.get("n_layers") if isinstance(config.get("n_layers"), int) else None
    family = FAMILIES.get(config.get("model_type", ""))
    return write_peft(points, tensors, Path(out), depth=depth, fan_in_fan_out=bool(family and family.fan_in_fan_out),
                      base_model_name_or_path=base_model_name_or_path or config.get("hf"), force=force)


def _pick(name: str | None, held: list[str], where: str) -> str:
    if name is None:
        if len(held) != 1:
            raise ConfigError(f"export: {where} holds LoRA {', '.join(held) or 'none'}; say which with --name")
        return held[0]
    if name not in held:
        raise ConfigError(f"export: {where} holds no LoRA named '{name}'; it holds {', '.join(held) or 'none'}")
    return name


def _lora_folder(path: Path, name: str | None) -> Path:
    if is_part(path):
        return path
    base = path / "lora" if (path / "lora").is_dir() else resolve_checkpoint(path) / "lora"
    held = sorted(p.name for p in base.iterdir() if is_part(p)) if base.is_dir() else []
    return base / _pick(name, held, str(path))
