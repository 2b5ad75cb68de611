"""``prefix``: prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").
P learned keys and values in front of every attention layer's own; every model weight is frozen.

The prefixes go into the model's ``kv_prefix`` slot (``tuneforge.sdk.LanguageModel``), which both tuneforge's
embedded model and Hugging Face models have, so nothing here knows a model's layers. The mechanism is a
:class:`tuneforge.sdk.PartMechanism`: named per-task prefixes (``tasks=``), loaded with ``load=``, written into
every checkpoint as part folders (``prefixes/<task>/``), routed per row in mixed batches, switched off for RLHF's
reference (``routing.base()``), and the default objective (the data as given) when no other plugin brings one.

New prefixes start from real tokens' keys and values (``init=vocab``, random letters; ``init=text:WORDS``), which
the paper found trains better and steadier than random values (``init=random``, at the scale of real keys).
"""
from __future__ import annotations

import dataclasses

import torch

from tuneforge.sdk import (WHOLE, ConfigError, PartMechanism, PartOptions, hookimpl, parse_layers, part_generator,
                           token_keys_values)

from .prefixes import Prefix, Prefixes

__all__ = ["PrefixTuning"]


class PrefixTuning(PartMechanism):
    """Learned per-layer key/value prefixes on a frozen model (see the module docstring)."""

    name = "prefix"  # what -m names it by, and its entry point's name
    mechanism = "prefix"
    subdir = "prefixes"
    point_fields = {"tokens": WHOLE, "heads": WHOLE, "width": WHOLE}  # per block: the saved keys' shape

    @dataclasses.dataclass
    class Options(PartOptions):
        tokens: int = 8  # P: key/value pairs in front of each layer's
        init: str = "vocab"  # vocab (real tokens: random letters), random (real keys' scale) or text:WORDS

        def __post_init__(self):
            super().__post_init__()
            if self.tokens < 1:
                raise ValueError(f"tokens must be at least 1, got {self.tokens}")
            if self.init not in ("vocab", "random") and not self.init.startswith("text:"):
                raise ValueError(f"init must be vocab, random or text:WORDS, got {self.init!r}")

    # -- the parts: prefixes in the model's kv_prefix slot -----------------------------------------------------

    def part_modules(self, model) -> list[Prefixes]:
        slot = getattr(model, "kv_prefix", None)
        return [slot] if isinstance(slot, Prefixes) else []

    @staticmethod
    def _slot(model) -> Prefixes:
        """The model's :class:`Prefixes`, put into its empty ``kv_prefix`` slot first if need be."""
        if not hasattr(model, "kv_prefix") or not hasattr(model, "kv_shape"):
            raise ConfigError(f"prefix: a {type(model).__name__} has no kv_prefix slot; prefix tuning needs a tuneforge "
                              "model (the embedded one or --model hf:PATH)")
        if model.kv_prefix is None:
            model.kv_prefix = Prefixes(model.kv_shape).to(model.tok_emb.weight.device)
        elif not isinstance(model.kv_prefix, Prefixes):
            raise ConfigError(f"prefix: the model's kv_prefix slot already holds {type(model.kv_prefix).__name__}")
        return model.kv_prefix

    def create(self, model, run, name: str) -> None:
        layers = parse_layers(self.options.layers, len(model.blocks), owner="prefix")
        keys, values = self._initial(model, run, name, layers)
        self._slot(model).add(name, Prefix(layers, keys, values))

    def _initial(self, model, run, name: str, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) (L', H_kv, P, D) a new prefix starts from: what the model computes for real tokens."""
        P, init, g = self.options.tokens, self.options.init, part_generator(run.seed, name)
        if init.startswith("text:"):
            ids = run.tokenizer.encode(init[5:])
            if not ids:
                raise ConfigError("prefix: init=text: needs words, e.g. init=text:is this review good or bad")
            ids = (ids * (P // len(ids) + 1))[:P]
        else:  # random lowercase letters and spaces, the common tokens of the data (also the scale for random)
            common = run.tokenizer.encode("abcdefghijklmnopqrstuvwxyz ")
            ids = [common[i] for i in torch.randint(len(common), (P,), generator=g).tolist()]
        device = model.tok_emb.weight.device
        real = token_keys_values(model, torch.tensor([ids], device=device))  # one KVPrefix (1, H, P, D) per block
        keys = torch.stack([real[i].keys[0] for i in layers]).float()  # (L', H_kv, P, D)
        values = torch.stack([real[i].values[0] for i in layers]).float()
        if init == "random":
            keys = torch.randn(keys.shape, generator=g).to(device) * keys.std()
            values = torch.randn(values.shape, generator=g).to(device) * values.std()
        return keys, values

    def export(self, model, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        part = self._slot(model).parts[name]
        tensors, points = {}, {}
        for i, layer in enumerate(part.layers):
            tensors[f"layers.{layer}.keys"] = part.keys[i]  # (H_kv, P, D)
            tensors[f"layers.{layer}.values"] = part.values[i]
            H, P, D = part.keys.shape[1:]
            points[f"layers.{layer}"] = {"tokens": P, "heads": H, "width": D}
        return tensors, points

    def install(self, model, name, manifest, tensors, where) -> None:
        layers = sorted(int(point.split(".")[1]) for point in manifest["points"])
        depth, (H, D) = len(model.blocks), model.kv_shape
        if layers[-1] >= depth:
            raise ConfigError(f"prefix: '{name}' from {where} has a prefix for block {layers[-1]}; this model has "
                              f"{depth} blocks: it was trained on another base")
        for layer in layers:
            point = manifest["points"][f"layers.{layer}"]
            if (point["heads"], point["width"]) != (H, D):
                raise ConfigError(f"prefix: '{name}' from {where} has {point['heads']} heads of {point['width']} at "
                                  f"block {layer}; this model's attention has {H} of {D}: trained on another base")
        device = model.tok_emb.weight.device
        keys = torch.stack([tensors[f"layers.{i}.keys"] for i in layers]).float().to(device)
        values = torch.stack([tensors[f"layers.{i}.values"] for i in layers]).float().to(device)
        self._slot(model).add(name, Prefix(layers, keys, values))

    # -- hooks the base does not cover -------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        self._slot(model)  # the slot is checked before anything is loaded
        super().tuneforge_modify_model(model, run)

    @hookimpl
    def tuneforge_validate(self, run, model):
        super().tuneforge_validate(run)
        if self.held(model):  # one token through the model now: a model that cannot take the prefix (a Hugging Face
            # one loaded with ?attn=eager) says so before anything is written, not at the first step
            with torch.no_grad():
                model.forward_hidden(torch.tensor([[run.tokenizer.bos_id]], device=model.tok_emb.weight.device))

    @hookimpl
    def tuneforge_run_end(self, model, summary):
        prefixes = self.part_modules(model)
        if prefixes and self.trained:
            summary["prefix"] = {"tasks": list(self.trained), "tokens": self.options.tokens,
                                 "parameters": sum(p.numel() for n in self.trained
                                                   for p in prefixes[0].part_parameters(n))}
