"""Hugging Face transformers models as tuneforge models: ``--model hf:PATH`` or :func:`load`.

A local model folder (``config.json``, safetensors weights, ``tokenizer.json``) is loaded with transformers
and wrapped in :class:`HFCausalLM`, which gives every mechanism the interface of the embedded ``Transformer``:
``blocks``, ``tok_emb``, ``ln_f``, a replaceable ``lm_head``, the ``prefix`` slot for soft prompts, the
``kv_prefix`` slot for extra attention keys and values, ``forward_hidden`` / ``forward`` with padding masks,
positions and a KV cache, and ``generate``.

The wrapper holds the transformers model's own modules under their own names (``transformer.h.0.attn.c_attn``,
``model.layers.0.self_attn.q_proj``), so module paths, LoRA targets and PEFT tensor names are those the model
has in transformers. GPT-2's ``Conv1D`` layers (a linear layer storing its weight as (in, out)) become
``nn.Linear`` with the same numbers transposed, so LoRA and the fused kernels treat every family alike.

Nothing is downloaded: a name that is not a local folder is refused. Attention runs through tuneforge's fused
op (``attn_implementation="tuneforge"``, see :mod:`tuneforge.models.hf_attention`) unless ``attn=`` says otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
from pathlib import Path

import torch
import torch.nn as nn

from tuneforge.errors import CheckpointError, ConfigError
from tuneforge.models import hf_attention
from tuneforge.models.families import FAMILIES, Family, family_for
from tuneforge.models.generation import Generates, plan_input
from tuneforge.models.hf_cache import HFCache
from tuneforge.models.hf_reading import quiet, reading, safetensors_problem
from tuneforge.models.hf_mlp import fuse_gated_mlps
from tuneforge.models.hf_tokenizer import HFTokenizer, read_json
from tuneforge.models.kv_slot import check_unpacked, layer_prefixes
from tuneforge.models.tokenizer import check_vocabulary

__all__ = ["HFConfig", "HFCausalLM", "HFCache", "load", "is_hf_spec", "parse_hf_spec", "parse_options",
           "from_saved_config", "DEFAULT_DTYPES"]

PREFIX = "hf:"
ATTENTION = ("tuneforge", "eager", "sdpa")
DEFAULT_DTYPES = {"cuda": "bfloat16"}  # by device type, when no dtype is asked for (tensor cores); else float32


def is_hf_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_hf_spec(spec: str) -> tuple[str, dict]:
    """``hf:PATH`` or ``hf:PATH?attn=eager&dtype=bfloat16`` -> (PATH, options)."""
    return parse_options(spec, spec[len(PREFIX):])


def parse_options(spec: str, body: str) -> tuple[str, dict]:
    """``PATH?attn=eager&dtype=bfloat16`` (``body``, the part of ``spec`` after its kind) -> (PATH, options);
    shared by every spec that ends in a transformers model (``hf:``, ``gguf:``, named models)."""
    path, _, query = body.partition("?")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in ("attn", "dtype"):
            raise ConfigError(f"--model {spec}: options after '?' are attn=tuneforge|eager|sdpa and dtype=float32|"
                              f"bfloat16|float16, joined by '&'; got {item!r}")
        options[key] = value
    return path, options


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """What a run records about a Hugging Face base model (``run.model_config``; saved in every checkpoint).

    The dimension names are the embedded model's, so mechanisms read ``d_model`` or ``max_seq_len`` from
    either. ``hf`` is the model folder, which a saved run needs again to be rebuilt."""

    hf: str
    model_type: str
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    weights: str = "pretrained"  # or "random": built from the folder's config.json only (pretraining)
    attn: str = "tuneforge"
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("--model hf:PATH needs Hugging Face transformers: pip install 'tuneforge[hf]' "
                          "(transformers and tokenizers)") from None
    hf_attention.register()
    return transformers


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"hf:{path}: {folder} has no config.json; point --model hf: at a folder written by "
                              "transformers' save_pretrained (config.json, model.safetensors, tokenizer.json)")
        return folder.resolve()
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", str(path)) and not str(path).startswith(".")
    if hub_like:
        raise ConfigError(
            f"hf:{path} is not a local folder, and tuneforge never downloads. If it is a Hugging Face Hub name, "
            f"download it first (huggingface-cli download {path} --local-dir models/{Path(str(path)).name}) and "
            f"pass --model hf:models/{Path(str(path)).name}")
    raise ConfigError(f"hf:{path}: no such folder")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype={name!r} is not a floating point torch dtype; use float32, bfloat16 or float16")
    return value


def _linearize(module: nn.Module) -> None:
    """Replace transformers' ``Conv1D`` layers (weight (in, out)) with ``nn.Linear`` (weight (out, in))."""
    from transformers.pytorch_utils import Conv1D
    for path, child in list(module.named_modules()):
        if isinstance(child, Conv1D):
            w = child.weight  # (in, out)
            linear = nn.Linear(w.size(0), w.size(1), bias=child.bias is not None, device=w.device, dtype=w.dtype)
            linear.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)  # (out, in)
            if child.bias is not None:
                linear.bias = child.bias
            parent, _, leaf = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, linear)


def _detect_family(model_type: str, causal_lm: nn.Module, n_layers: int) -> Family:
    """The family of a model type tuneforge has no table for: blocks found by structure (the ModuleList with
    one entry per layer), sub-layers by their usual names. LoRA targets are then module path patterns."""
    known = family_for(model_type)
    if known is not None:
        return known
    lists = [p for p, m in causal_lm.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise ConfigError(f"a '{model_type}' model: found no list of {n_layers} blocks; tuneforge knows "
                          f"{', '.join(sorted(FAMILIES))}")
    block = causal_lm.get_submodule(lists[0])[0]
    names = [n for n, _ in block.named_children()]
    attn = next((n for n in names if "attn" in n or "attention" in n), "attn")
    mlp = next((n for n in names if "mlp" in n or "feed_forward" in n or "ffn" in n), "mlp")
    aliases = {"attn": [f"{attn}.*"], "mlp": [f"{mlp}.*"], "all": [f"{attn}.*", f"{mlp}.*"]}
    return Family(model_type, lists[0], {"attn": attn, "mlp": mlp}, aliases)


class HFCausalLM(Generates, nn.Module):
    """A transformers causal LM with the embedded model's interface; see the module docstring."""

    def __init__(self, causal_lm: nn.Module, config: HFConfig, family: Family, tokenizer: HFTokenizer):
        super().__init__()
        self.base_name = causal_lm.base_model_prefix  # "transformer" (GPT-2), "model" (Llama, Qwen...)
        # The transformers model's own children under their own names: paths stay those of transformers.
        self.add_module(self.base_name, getattr(causal_lm, self.base_name))
        self.lm_head = causal_lm.get_output_embeddings()
        self.prefix: nn.Module | None = None
        self.kv_prefix: nn.Module | None = None  # extra keys/values for every attention call (see kv_slot)
        self.kv_shape = hf_attention.kv_shape(causal_lm.config)  # (H_kv, D)
        self.config = config
        self.family = family
        self.tokenizer = tokenizer
        # Kept for its config and for users; not a submodule, since its parameters are already registered above.
        object.__setattr__(self, "hf_model", causal_lm)
        # Parameters still holding the folder's weights (none for a random init): checkpoints leave them out.
        self._folder_ids: set[int] = set()
        self._folder_source: dict = {"folder": config.hf}
        accepted = inspect.signature(self.base.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5

    # -- the embedded model's interface ----------------------------------------------------------------------

    @property
    def base(self) -> nn.Module:
        return getattr(self, self.base_name)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.family.blocks)

    @property
    def tok_emb(self) -> nn.Embedding:
        return self.base.get_input_embeddings()

    @property
    def ln_f(self) -> nn.Module:
        for name in ("ln_f", "norm", "final_layernorm", "final_layer_norm"):
            if isinstance(getattr(self.base, name, None), nn.Module):
                return getattr(self.base, name)
        raise ConfigError(f"this {self.config.model_type} model has no final norm under a name tuneforge knows")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> HFCache:
        """An empty cache: for ``max_len`` tokens, preallocated and written in place (the batch size is taken from
        the first call), with tuneforge's attention; otherwise one that grows as it goes."""
        # Preallocated only where attention reads just the filled slots (tuneforge's drops the empty ones by the
        # padding mask); transformers' eager and sdpa would attend over all max_len slots, masked, every step.
        static = max_len is not None and self.hf_model.config._attn_implementation == "tuneforge"
        return HFCache(self.hf_model.config, max_len if static else None, batch_size)

    def forward_hidden(self, idx, *, key_padding_mask=None, positions=None, cache=None, cu_seqlens=None):
        """Final-normed hidden states (B, T, C); arguments as for ``Transformer.forward_hidden``.

        Packed rows (``cu_seqlens``) need tuneforge's attention (``attn=tuneforge``, the default), which receives
        the offsets from every layer (see ``hf_attention``); a model loaded with eager or sdpa attention refuses
        them (ConfigError), as does one whose layers do not hand transformers' attention kwargs on. The same goes for
        the extra keys and values of the ``kv_prefix`` slot, which travel to every layer's attention the same way.
        """
        if cu_seqlens is not None:
            self._check_packing()
        plan = plan_input(self, idx, key_padding_mask, positions, cache, cu_seqlens)
        B = idx.size(0)
        extras = layer_prefixes(self, B)
        if extras is not None:
            check_unpacked(cu_seqlens)
            self._check_packing("extra attention keys (model.kv_prefix, e.g. prefix tuning)", "or drop the prefix")
        x = self.tok_emb(idx)  # (B, T, C)
        pos = plan.positions  # (B, T)
        if plan.fresh:
            pre = plan.prefix
            x = torch.cat([pre.emb.to(x.dtype), x], dim=1)  # (B, K + T, C)
            pre_pos = pre.positions()
            pos = torch.cat([pre_pos.expand(B, -1) if pre_pos.dim() == 1 else pre_pos, pos], dim=1)  # (B, K + T)
        mask = plan.key_padding_mask
        if mask is None:  # always a mask: then transformers never guesses packed sequences from the positions
            seen = (cache.length if cache is not None else 0) + x.size(1)
            mask = torch.ones(B, seen, dtype=torch.long, device=idx.device)  # (B, cached + K + T)
        kwargs = {self._cache_arg: cache.kv, "use_cache": True} if cache is not None else {"use_cache": False}
        carried = hf_attention.carried(plan.cu_seqlens, extras)  # through transformers' **kwargs to every attention
        out = self.base(inputs_embeds=x, attention_mask=mask.long(), position_ids=pos.long(), **kwargs, **carried)
        hf_attention.check_reached(carried, len(self.blocks), self.config.model_type)
        if cache is not None:
            cache.length += x.size(1)
        h = out.last_hidden_state  # (B, K + T, C)
        return h[:, plan.length:] if plan.fresh else h  # (B, T, C): the caller's tokens only

    def forward(self, idx, **kwargs):
        """Next-token logits (B, T, V); keyword arguments as in :meth:`forward_hidden`."""
        return self.lm_head(self.forward_hidden(idx, **kwargs))

    def _check_packing(self, what: str = "packed rows (cu_seqlens)", instead: str = "or set packing=false") -> None:
        """Packed rows (and extra keys) need tuneforge's attention: transformers' eager and sdpa never see the
        offsets (and a 4-D mask built here would replace the model's own mask patterns, such as sliding windows)."""
        impl = self.hf_model.config._attn_implementation
        if impl != hf_attention.attention_implementation_name:
            raise ConfigError(
                f"{what} need tuneforge's attention, but this model runs attn={impl}: load it "
                f"with ?attn=tuneforge (the default, e.g. --model hf:{self.config.hf}) {instead}")

    # -- weights that stay in the folder (see tuneforge.engine.checkpoint) ------------------------------------------------

    def folder_weights(self) -> tuple[set[str], dict]:
        """(names of the frozen parameters that still hold the folder's values, the folder's identity): what a
        checkpoint need not store. Trained parameters, new modules and anything a checkpoint overwrote are not."""
        names = {n for n, p in self.named_parameters(remove_duplicate=False)
                 if id(p) in self._folder_ids and not p.requires_grad}
        return names, self._folder_source

    def check_folder_weights(self, referenced: dict, *, where: str) -> None:
        """Refuse a checkpoint whose left-out weights this model does not hold as they were saved."""
        if referenced.get("files") != self._folder_source.get("files"):
            raise CheckpointError(
                f"{where} keeps its base weights in {referenced.get('folder')}, whose weight files have changed since "
                "(other sizes or contents): put back the model it was trained on")
        held = {n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in self._folder_ids}
        lacking = sorted(set(referenced["names"]) - held)
        if lacking:
            raise CheckpointError(f"{where} expects {lacking[:3]} to be the folder's weights, but this model's are not "
                                  "(it was not built from the folder); load it with tuneforge.load_model")

    def loaded_over_folder(self, loaded) -> None:
        """The tensors named in ``loaded`` now hold a checkpoint's values, no longer the folder's."""
        current = dict(self.named_parameters(remove_duplicate=False))
        self._folder_ids -= {id(current[n]) for n in loaded if n in current}

    def from_scratch(self, seed: int) -> "HFCausalLM":
        """The same architecture and tokenizer with random weights (transformers' own init), seeded."""
        if self.config.weights == "random":
            return self
        fresh = load(self.config.hf, weights="random", attn=self.config.attn, dtype=self.config.dtype, seed=seed)
        fresh.config = dataclasses.replace(self.config, weights="random")  # a GGUF model's stays a GGUFConfig
        return fresh


def _build(transformers, folder: Path, hf_config, weights: str, attn: str, dtype: torch.dtype, seed: int):
    auto = transformers.AutoModelForCausalLM
    if weights == "pretrained":
        return auto.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn, dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's random stream
        torch.manual_seed(seed)
        return auto.from_config(hf_config, attn_implementation=attn, dtype=dtype)


def load(path: str | Path, *, weights: str = "pretrained", attn: str = "tuneforge", dtype: str | None = None,
         seed: int = 0, device: str | torch.device | None = None, source: dict | None = None) -> HFCausalLM:
    """A local Hugging Face model folder as a tuneforge model (the Python face of ``--model hf:PATH``).

    weights: ``pretrained`` (the folder's weights) or ``random`` (its config.json, transformers' init, seeded).
    attn: ``tuneforge`` (the fused op), ``eager`` or ``sdpa``. dtype: the parameters' (None: by device, DEFAULT_DTYPES).
    source: where the folder's weights come from, as checkpoints record it (``{"folder": ..., "files": [[name,
    size, hash], ...]}``); default: the folder and its weight files. A folder converted from another file (a
    GGUF) names that file, so a checkpoint is checked against what the user has, not against a cache.
    """
    if weights not in ("pretrained", "random"):
        raise ConfigError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    if attn not in ATTENTION:
        raise ConfigError(f"attn={attn!r}: use one of {', '.join(ATTENTION)}")
    transformers = _transformers()
    folder = _folder(path)
    torch_dtype = _dtype(dtype := dtype or DEFAULT_DTYPES.get(torch.device(device or "cpu").type, "float32"))
    spec = f"hf:{path}"
    read_json(folder / "config.json")  # names the line of a broken config.json, which transformers does not
    with reading(spec, "config.json"):
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if weights == "pretrained":
        for f in sorted(folder.glob("*.safetensors")):
            problem = safetensors_problem(f)
            if problem:
                raise ConfigError(f"--model {spec}: {f} {problem}; it was not copied or downloaded completely: "
                                  "copy it again")
    with quiet(transformers), reading(spec, "weights" if weights == "pretrained" else "model from config.json"):
        causal_lm = _build(transformers, folder, hf_config, weights, attn, torch_dtype, seed)
    _linearize(causal_lm)
    c = causal_lm.config
    n_layers = int(c.num_hidden_layers)
    family = _detect_family(c.model_type, causal_lm, n_layers)
    config = HFConfig(hf=str(folder), model_type=c.model_type, family=family.name, vocab_size=int(c.vocab_size),
                      d_model=int(c.hidden_size), n_layers=n_layers, n_heads=int(c.num_attention_heads),
                      max_seq_len=int(getattr(c, "max_position_embeddings", 0) or getattr(c, "n_positions")),
                      weights=weights, attn=attn, dtype=dtype)
    tokenizer = HFTokenizer(folder, c.to_dict())
    check_vocabulary(causal_lm.get_input_embeddings(), tokenizer, where=f"--model {spec}", fix=(
        f"tokenizer.json is not this model's (config.json: vocab_size {c.vocab_size}); put the model's own "
        f"tokenizer files in {folder}, or resize the model to the tokenizer (model.resize_token_embeddings"
        "(len(tokenizer)) in transformers) and save it again"))
    model = HFCausalLM(causal_lm, config, family, tokenizer)
    if attn == "tuneforge":  # tuneforge's own path; eager/sdpa stay transformers' code, for comparisons
        fuse_gated_mlps(model.blocks, family)
    if weights == "pretrained":
        model._folder_ids = {id(p) for p in model.parameters()}
        model._folder_source = source or {"folder": str(folder), "files": _fingerprint(folder)}
    if device is not None:
        model.to(device)
    return model.train(False)


def _fingerprint(folder: Path) -> list:
    """Name, size and a hash of the first MiB (the safetensors header: every tensor's name, shape and offset) of
    each weight file: cheap, and it changes when the folder holds another model."""
    out = []
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        with open(f, "rb") as fh:
            out.append([f.name, f.stat().st_size, hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]])
    return out


def from_saved_config(d: dict, *, pretrained: bool = False) -> HFCausalLM:
    """The base model of a checkpoint whose ``model_config`` is an :class:`HFConfig`, so the folder must still be
    there. ``pretrained``: with the folder's weights (the checkpoint left some of them there), else from its
    config only (the checkpoint holds every weight)."""
    if not Path(d["hf"]).is_dir():
        raise ConfigError(f"this checkpoint was trained on the Hugging Face model in {d['hf']}, which is gone; "
                          "put the model folder back there (its config.json and tokenizer.json are needed)")
    model = load(d["hf"], weights="pretrained" if pretrained else "random", attn=d.get("attn", "tuneforge"),
                 dtype=d.get("dtype", "float32"))
    model.config = dataclasses.replace(model.config, weights=d.get("weights", "pretrained"))  # as it was recorded
    return model
