"""``prompt-tuning``: K learned virtual-token embeddings prepended to the input; every model weight is frozen.

Several named prompts (one per task) live on one model as :class:`SoftPrompts` in the model's ``prefix`` slot.
Rows of a batch pick their prompt through :func:`tuneforge.models.routing.rows`, so one forward pass can serve (and
train) a mixed batch; rows with prompts of different lengths are left-padded inside the prefix and masked.

Each prompt is saved as a tiny safetensors file (``prompts/<task>.safetensors`` in every checkpoint) and can be
loaded onto another run with ``load=`` (a prompt file, a folder of them, a checkpoint or a run folder). With no
other objective in the run, prompt tuning learns the data as given (a default objective): label words on labelled
records, next tokens on text.

The mechanism is a :class:`tuneforge.sdk.PartMechanism` whose parts are stored as prompt files, not part folders:
it overrides the base's storage seams with :mod:`.prompts`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from tuneforge.sdk import (ConfigError, ObjectiveOptions, PartMechanism, base_fingerprint, check_name, hookimpl,
    part_generator)

from .prompts import PROMPTS_DIR, TENSOR, SoftPrompts, check_width, read_prompt, saved_shapes, write_prompt

__all__ = ["PromptTuning", "load_prompts", "add_prompts"]


class PromptTuning(PartMechanism):
    """Soft prompts, one per task, on a frozen model (see the module docstring)."""

    mechanism = "prompt-tuning"
    subdir = PROMPTS_DIR
    saved_one = "prompt file (.safetensors)"
    saved_many = "prompt files"

    @dataclasses.dataclass
    class Options(ObjectiveOptions):
        tasks: Optional[list[str]] = None  # prompts to train (new, or loaded ones to continue); default 'default'
        tokens: int = 16  # K, virtual tokens of each new prompt
        init: str = "vocab"  # vocab (embeddings of random letters), random, or text:WORDS (those words' embeddings)
        load: list[str] = dataclasses.field(default_factory=list)  # prompt files, checkpoint or run folders

        def __post_init__(self):
            super().__post_init__()
            if self.tokens < 1:
                raise ValueError(f"tokens must be at least 1, got {self.tokens}")
            if self.init not in ("vocab", "random") and not self.init.startswith("text:"):
                raise ValueError(f"init must be vocab, random or text:WORDS, got {self.init!r}")
            if self.tasks is not None:
                self.tasks = [t for t in self.tasks if t]
            for t in self.tasks or []:
                check_name(t, what="task name", where="option tasks")

    def __init__(self, options: Options):
        super().__init__(options)
        self.module: SoftPrompts | None = None
        self.fingerprint = ""  # of the base the prompts train on, written into every prompt file

    # -- the parts: prompts in the model's prefix slot ---------------------------------------------------------

    def part_modules(self, model) -> list[SoftPrompts]:
        prefix = getattr(model, "prefix", None)
        return [prefix] if isinstance(prefix, SoftPrompts) else []

    @staticmethod
    def _slot(model) -> SoftPrompts:
        """The model's :class:`SoftPrompts`, put into its empty prefix slot first if need be."""
        if not hasattr(model, "prefix"):
            raise ConfigError("prompt-tuning needs a model with a prefix slot (tuneforge's Transformer); "
                              f"got {type(model).__name__}")
        if model.prefix is None:
            model.prefix = SoftPrompts(model.config.d_model)
        elif not isinstance(model.prefix, SoftPrompts):
            raise ConfigError(f"prompt-tuning: the model's prefix slot already holds {type(model.prefix).__name__}")
        return model.prefix

    def create(self, model, run, name: str) -> None:
        self._slot(model).add(name, self._new_prompt(model, run, name))

    def _new_prompt(self, model, run, name: str) -> torch.Tensor:
        emb, K = model.tok_emb.weight.detach(), self.options.tokens
        g = part_generator(run.seed, name)
        init = self.options.init
        if init == "random":  # the scale of real token embeddings, so the frozen model sees familiar magnitudes
            return torch.randn(K, emb.size(1), generator=g) * emb.std().cpu()
        if init.startswith("text:"):
            ids = run.tokenizer.encode(init[5:])
            if not ids:
                raise ConfigError("prompt-tuning: init=text: needs words, e.g. init=text:classify this review")
            ids = (ids * (K // len(ids) + 1))[:K]
        else:  # vocab: embeddings of random lowercase letters and spaces, the common tokens of the data
            common = run.tokenizer.encode("abcdefghijklmnopqrstuvwxyz ")
            ids = [common[i] for i in torch.randint(len(common), (K,), generator=g).tolist()]
        return emb[torch.tensor(ids, device=emb.device)].cpu().clone()  # (K, C)

    def export(self, model, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        return {TENSOR: self._slot(model).prompts[name]}, {}  # a prompt has no insertion points

    def install(self, model, name, manifest, tensors, where) -> None:
        check_width(model, name, tensors[TENSOR], where)
        self._slot(model).add(name, tensors[TENSOR].float().to(model.tok_emb.weight.device))

    # -- stored as prompt files (the base's seams) -------------------------------------------------------------

    def is_saved(self, path: Path) -> bool:
        return Path(path).is_file()

    def saved_in(self, folder: Path) -> list[Path]:
        return sorted(Path(folder).glob("*.safetensors"))

    def read_saved(self, where: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
        name, meta, prompt = read_prompt(where)
        return name, meta, {TENSOR: prompt}

    def write_saved(self, model, name: str, folder: Path) -> None:
        tensors, _ = self.export(model, name)
        write_prompt(folder, name, tensors[TENSOR], base=self.fingerprint)

    def restore(self, model, checkpoint: Path) -> None:
        # The shapes come from the model file (its weights load over these zeros): a rebuild needs nothing else.
        sp = self._slot(model)
        for name, shape in saved_shapes(checkpoint).items():
            if name not in sp.prompts:
                sp.add(name, torch.zeros(shape))

    def base_note(self, manifest, model, where) -> str | None:
        if manifest.get("base") in (None, base_fingerprint(model)):
            return None
        name = manifest.get("name") or manifest.get("task") or Path(where).stem
        return (f"prompt-tuning: prompt '{name}' from {where} was trained on a base of other shapes; loading it "
                "anyway (same width)")

    # -- hooks the base does not cover -------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        sp = self._slot(model)  # the slot is checked before anything is loaded
        super().tuneforge_modify_model(model, run)
        longest = sp.max_length
        if longest >= model.config.max_seq_len:
            raise ConfigError(f"prompt-tuning: a prompt of {longest} tokens leaves no room in the model's context of "
                              f"{model.config.max_seq_len}; lower tokens=")
        model.prefix = sp.to(model.tok_emb.weight.device)
        self.module = sp
        self.fingerprint = base_fingerprint(model)

    @hookimpl
    def tuneforge_run_start(self, run):
        if self.trained:
            sizes = ", ".join(f"{n} ({self.module.prompts[n].size(0)} tokens)" for n in self.trained)
            run.log(f"prompt-tuning: training {sizes}; every model weight is frozen")

    def objective_reserve(self) -> int:
        return self.module.max_length


def load_prompts(spec: str) -> dict[str, tuple[torch.Tensor, dict]]:
    """Prompts in a file, a folder of them, a checkpoint or a run folder: task -> (tensor (K, C), metadata). A task
    name (the file's ``task`` metadata, else its file name) must be a valid name: it names a file of every
    checkpoint."""
    out = {}
    for path in PromptTuning(PromptTuning.Options()).saved_at(spec):
        name, meta, prompt = read_prompt(path)
        out[name] = (prompt, meta)
    return out


def add_prompts(model, *specs: str) -> SoftPrompts:
    """Load the prompts of files, checkpoint or run folders onto ``model`` (frozen), for serving: route rows to
    them with :func:`tuneforge.models.routing.rows`. Returns the model's :class:`SoftPrompts`. A prompt of a name
    already loaded is replaced; ``PromptTuning.load_frozen`` refuses one instead."""
    sp = model.prefix if isinstance(model.prefix, SoftPrompts) else SoftPrompts(model.config.d_model)
    for spec in specs:
        for name, (prompt, _) in load_prompts(spec).items():
            check_width(model, name, prompt, spec)
            sp.add(name, prompt.float())
    sp.requires_grad_(False)
    model.prefix = sp.to(model.tok_emb.weight.device)
    return sp
