"""One way from a model's name to a model: a ``--model`` spec, or the description a checkpoint saved.

Every form a model can be named in resolves here, through :func:`build`:

- ``tiny``, ``small``, ``tiny:n_layers=2,d_model=64``: a preset of the embedded :class:`Transformer`, seeded;
- ``hf:PATH`` (``hf:PATH?attn=eager&dtype=bfloat16``): a local Hugging Face folder (:mod:`tuneforge.models.hf`);
- ``gguf:PATH`` and named models (``smollm2-135m``), same options: a GGUF file, converted once into a cached
  Hugging Face folder (:mod:`tuneforge.models.gguf`);
- a saved description (``model_config`` in a checkpoint's ``state.json``, the ``to_dict()`` of what ``build``
  returned): a fresh base of the same architecture, for the checkpoint's weights to be loaded into.

Each form is a :class:`ModelKind` in :data:`KINDS`. A new form is one more entry there: what it claims, how it builds, how it rebuilds from its saved description, and how its specs are written
(for messages). A spec no entry claims names a preset (:data:`PRESET`), whose error lists the presets and the
other kinds' forms.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tuneforge.common.options import suggest
from tuneforge.errors import ConfigError
from tuneforge.models import gguf, hf
from tuneforge.models.tokenizer import check_vocabulary, id_limit, tokenizer_of
from tuneforge.models.transformer import PRESETS, ModelConfig, Transformer, model_config

__all__ = ["Description", "ModelKind", "KINDS", "PRESET", "DEFAULT_SPEC", "kind_of", "build", "same_architecture",
           "available", "FOLDER_FORMS"]

DEFAULT_SPEC = "tiny"  # what a run without --model (and without --init) trains

# What a run records about its base model (``run.model_config``); ``to_dict()`` is saved as ``model_config``.
Description = ModelConfig | hf.HFConfig  # (a GGUF model's is a gguf.GGUFConfig, an HFConfig with its file)


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One form of model spec and of the description a checkpoint saves for it.

    :param form: how a spec of this kind is written, as messages show it (``hf:PATH``).
    :param claims: whether a ``--model`` string is of this kind.
    :param owns: whether a saved description (a dict) is of this kind.
    :param build: ``(spec, seed, device)`` -> a fresh model (``device``: where it will run, or None; a kind may
        choose its default dtype by it, e.g. bfloat16 for an HF model on CUDA); the global torch generator is seeded with ``seed`` by it, so
        what is created after the base (a plugin's new modules) starts from the run's seed.
    :param rebuild: ``(description, pretrained)`` -> a base of the saved architecture, for a checkpoint's weights;
        ``pretrained``: the checkpoint left weights in the model's own files, so they must be read from there.
    :param same: ``(spec, description)`` -> whether ``spec`` names the architecture ``description`` records.
    """

    name: str
    form: str  # how a spec of this kind is written, for messages: "hf:PATH"
    claims: Callable[[str], bool]
    owns: Callable[[dict], bool]
    build: Callable[[str, int, "torch.device | None"], nn.Module]
    rebuild: Callable[[dict, bool], nn.Module]
    same: Callable[[str, dict], bool]


def _preset_build(spec: str, seed: int, device=None) -> nn.Module:
    name = spec.partition(":")[0].strip()
    if name and name not in PRESETS:  # before its options are parsed: "gguf:x" is an unknown kind, not bad options
        others = ", ".join(k.form for k in KINDS.values())
        raise ConfigError(f"unknown model preset '{name}'{suggest(name, [*PRESETS, *gguf.NAMED])}; presets: "
                          f"{', '.join(PRESETS)}"
                          + (f" (other models: {others})" if others else ""))
    mcfg = model_config(spec)
    torch.manual_seed(seed)
    model = Transformer(mcfg)
    tok = tokenizer_of(model)
    check_vocabulary(model.tok_emb, tok, where=f"--model {spec}",
                     fix=f"leave vocab_size out or make it at least {id_limit(tok)}")
    return model


def _by_device(options: dict, device) -> dict:
    if options.get("dtype") is None and device is not None:  # bfloat16 on CUDA unless ?dtype= says otherwise
        options = {**options, "dtype": hf.DEFAULT_DTYPES.get(torch.device(device).type, "float32")}
    return options


def _hf_build(spec: str, seed: int, device=None) -> nn.Module:
    path, options = hf.parse_hf_spec(spec)
    model = hf.load(path, seed=seed, **_by_device(options, device))  # its random init forks the generator
    torch.manual_seed(seed)
    return model


def _gguf_build(spec: str, seed: int, device=None) -> nn.Module:
    _, _, options = gguf.parse_gguf_spec(spec)  # the spec's options; load reads them again, and they win
    model = gguf.load(spec, seed=seed, dtype=_by_device(options, device).get("dtype"))
    torch.manual_seed(seed)
    return model


def _gguf_rebuild(saved: dict, pretrained: bool) -> nn.Module:
    return gguf.from_saved_config(saved, pretrained=pretrained)


def _gguf_same(spec: str, saved: dict) -> bool:
    """The same file: by path, or by content (a named model's package reinstalled elsewhere)."""
    file = gguf.parse_gguf_spec(spec)[0]
    return str(file) == saved.get("gguf") or gguf.file_hash(file) == saved.get("sha256")


def _hf_same(spec: str, saved: dict) -> bool:
    return Path(hf.parse_hf_spec(spec)[0]).expanduser().resolve() == Path(saved["hf"])


# The embedded model's presets: any spec no other kind claims, so a misspelt name gets the presets' own error.
PRESET = ModelKind(
    name="preset",
    form="tiny, small, tiny:key=value,...",
    claims=lambda spec: True,
    owns=lambda saved: True,
    build=_preset_build,
    rebuild=lambda saved, pretrained: Transformer(ModelConfig.from_dict(saved)),
    same=lambda spec, saved: model_config(spec) == ModelConfig.from_dict(saved),
)

def _named(name: str) -> ModelKind:
    return ModelKind(
        name=name,
        form=name,
        claims=lambda spec: isinstance(spec, str) and spec.partition("?")[0] == name,
        owns=lambda saved: "gguf" in saved and saved.get("named") == name,
        build=_gguf_build,
        rebuild=_gguf_rebuild,
        same=_gguf_same,
    )


# Order matters for saved descriptions: a GGUFConfig is also an HFConfig (it has "hf"), so gguf kinds come first.
KINDS: dict[str, ModelKind] = {
    **{name: _named(name) for name in gguf.NAMED},
    "gguf": ModelKind(
        name="gguf",
        form="gguf:PATH",
        claims=lambda spec: isinstance(spec, str) and spec.startswith(gguf.PREFIX),
        owns=lambda saved: "gguf" in saved and not saved.get("named"),
        build=_gguf_build,
        rebuild=_gguf_rebuild,
        same=_gguf_same,
    ),
    "hf": ModelKind(
        name="hf",
        form="hf:PATH",
        claims=hf.is_hf_spec,
        owns=lambda saved: "hf" in saved and "gguf" not in saved,  # an HFConfig: the folder the model came from
        build=_hf_build,
        rebuild=lambda saved, pretrained: hf.from_saved_config(saved, pretrained=pretrained),
        same=_hf_same,
    ),
}


def kind_of(spec: str | dict) -> ModelKind:
    """The kind of a ``--model`` string or a saved description: the first entry of :data:`KINDS` that claims it,
    else :data:`PRESET`."""
    if isinstance(spec, str):
        return next((k for k in KINDS.values() if k.claims(spec)), PRESET)
    if isinstance(spec, dict):
        return next((k for k in KINDS.values() if k.owns(spec)), PRESET)
    forms = "; ".join(k.form for k in [PRESET, *KINDS.values()])
    raise ConfigError(f"model {spec!r} is neither a spec ({forms}) nor a saved description (the model_config of "
                      "a checkpoint's state.json)")


def build(spec: str | dict | None, *, seed: int = 0, pretrained: bool = False,
          device=None) -> tuple[nn.Module, Description]:
    """The model ``spec`` names, and its description (``description.to_dict()`` is what a checkpoint saves as
    ``model_config``; passing that dict back here rebuilds the same architecture).

    :param spec: a ``--model`` string (None or empty: :data:`DEFAULT_SPEC`), or a saved description.
    :param seed: seeds the global torch generator: the random init of a fresh model, and of what a caller adds
        after it. A saved description is rebuilt after ``torch.manual_seed(seed)`` (its weights come after).
    :param pretrained: for a saved description only: whether the checkpoint left weights in the model's files.
    :param device: where the model will run (None: not known); it only picks defaults such as an HF model's dtype
        (bfloat16 on CUDA), the model is built on the CPU. A saved description keeps the dtype it records.
    :raises ConfigError: naming the spec and what to write instead.
    """
    spec = DEFAULT_SPEC if spec is None or spec == "" else spec  # as TrainConfig's model=None means
    kind = kind_of(spec)
    if isinstance(spec, str):
        model = kind.build(spec, seed, device)
    else:
        torch.manual_seed(seed)
        model = kind.rebuild(spec, pretrained)
    return model, model.config


def same_architecture(spec: str, saved: dict) -> bool:
    """Whether ``--model spec`` names the architecture of a saved description (``--model`` beside ``--init``).
    Kinds that rebuild alike describe models alike: ``gguf:PATH`` and the named model of the same file match."""
    kind, saved_kind = kind_of(spec), kind_of(saved)
    return (kind is saved_kind or kind.rebuild is saved_kind.rebuild) and kind.same(spec, saved)


# The forms that name a model file or folder of the user's own (what `tuneforge models` lists beside the names).
FOLDER_FORMS = {
    "hf:PATH": "a Hugging Face model folder (config.json, *.safetensors, tokenizer.json), as save_pretrained or "
               "huggingface-cli download writes it",
    "gguf:PATH": "a .gguf file (llama.cpp's format) of an architecture transformers reads, converted once into a "
                 "cached Hugging Face folder",
}
SPEC_OPTIONS = "?attn=tuneforge|eager|sdpa&dtype=float32|bfloat16|float16 (after hf:, gguf: and named models)"


def available() -> dict:
    """What ``--model`` can name without a download: the presets (with their sizes), the named models (installed
    or not, with the install line) and the forms for local files. ``tuneforge models`` prints it."""
    presets = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # counted without allocating or initialising anything
            params = sum(p.numel() for p in Transformer(cfg).parameters())
        presets.append({"name": name, "params": params, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                        "n_heads": cfg.n_heads, "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
                        "weights": "random", "default": name == DEFAULT_SPEC})
    named = []
    for name, entry in gguf.NAMED.items():
        row = {"name": name, "params": entry.params, "about": entry.about, "weights": "pretrained",
               "distribution": entry.distribution, "install": entry.install, "installed": False, "file": None,
               "converted": False}
        try:
            file = gguf.named_file(name)
        except ConfigError as exc:
            row["problem"] = str(exc)
        else:
            row.update(installed=True, file=str(file), converted=gguf.is_converted(file))
        named.append(row)
    forms = [{"form": form, "about": about} for form, about in FOLDER_FORMS.items()]
    return {"presets": presets, "named": named, "local": forms, "options": SPEC_OPTIONS,
            "cache": str(gguf.cache_root())}
