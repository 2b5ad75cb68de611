"""``prompt-tuning``: K learned virtual-token embeddings prepended to the input; every model weight is frozen.

Several named prompts (one per task) live on one model as :class:`SoftPrompts` in the model's ``prefix`` slot.
Rows of a batch pick their prompt through :func:`tuneforge.models.routing.rows`, so one forward pass can serve (and
train) a mixed batch; rows with prompts of different lengths are left-padded inside the prefix and masked.

Each prompt is saved as a tiny safetensors file (``prompts/<task>.safetensors`` in every checkpoint) and can be
loaded onto another run with ``load=``. With no other objective in the run, prompt tuning learns the data as
given (a default objective): label words on labelled records, next tokens on text.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.sdk import (MODEL_FILE, STATE_FILE, CheckpointError, ConfigError, DefaultObjective, ObjectiveOptions, Prefix, TaskModule,
    base_fingerprint, check_name, hookimpl, inside, part_generator, resolve_checkpoint)

__all__ = ["PromptTuning", "SoftPrompts", "load_prompts", "add_prompts", "base_fingerprint"]

FORMAT = "tuneforge.soft-prompt"
PROMPTS_DIR = "prompts"


class SoftPrompts(nn.Module, TaskModule):
    """Named soft prompts ``(K_task, C)``; as ``Transformer.prefix`` it prepends each row's task prompt."""

    kind = "soft prompts"

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.prompts = nn.ParameterDict()
        self.active = None  # the prompt of rows the caller did not route (None: the only one, if one)

    def add(self, name: str, value: torch.Tensor) -> None:
        if value.dim() != 2 or value.size(1) != self.d_model:
            raise ConfigError(f"prompt-tuning: prompt '{name}' has shape {tuple(value.shape)}; this model needs "
                              f"(tokens, {self.d_model})")
        self.prompts[name] = nn.Parameter(value.detach().clone())

    @property
    def names(self) -> list[str]:
        return list(self.prompts.keys())

    def task_names(self) -> list[str]:
        return self.names

    def part_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.prompts[name]]

    def forward(self, batch_size: int) -> Prefix | None:
        sel = self.selection(batch_size, next(iter(self.prompts.values())).device if self.prompts else None)
        if not sel.per_row:
            if not sel.shared:
                return None
            if len(sel.shared) > 1:
                raise ConfigError(f"soft prompts {', '.join(self.names[i] for i in sel.shared)} are all active; a row "
                                 "takes one: route rows with tuneforge.models.routing.rows([...])")
            p = self.prompts[self.names[sel.shared[0]]]
            return Prefix(p.unsqueeze(0).expand(batch_size, *p.shape))  # (B, K, C)
        chosen = [self.prompts[self.names[i]] if i >= 0 else None for i in sel.row_ids]
        lengths = [p.size(0) if p is not None else 0 for p in chosen]
        K = max(lengths)
        if min(lengths) == K:  # every row's prompt has K tokens: no padding, no mask
            return Prefix(torch.stack(chosen))  # (B, K, C)
        ref = next(p for p in chosen if p is not None)
        # right-align each prompt in K columns (left padding), so each row's own tokens follow it directly
        emb = torch.stack([F.pad(p, (0, 0, K - p.size(0), 0)) if p is not None else ref.new_zeros(K, self.d_model)
                           for p in chosen])  # (B, K, C)
        cols = torch.arange(K, device=emb.device)
        mask = cols[None, :] >= (K - torch.tensor(lengths, device=emb.device))[:, None]  # (B, K)
        return Prefix(emb, mask)


def _prompt_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir() and (path / PROMPTS_DIR).is_dir() and not (path / STATE_FILE).is_file():
        found = path / PROMPTS_DIR  # a folder of prompt files someone copied
    else:
        try:
            found = resolve_checkpoint(path) / PROMPTS_DIR
        except CheckpointError:
            raise ConfigError(f"prompt-tuning: load={spec} is neither a prompt file (.safetensors) nor a checkpoint "
                              "or run folder with prompts/") from None
    files = sorted(found.glob("*.safetensors")) if found.is_dir() else []
    if not files:
        raise ConfigError(f"prompt-tuning: {found} holds no prompt files; was that run a prompt-tuning run?")
    return files


def load_prompts(spec: str) -> dict[str, tuple[torch.Tensor, dict]]:
    """Prompts in a file, a checkpoint folder or a run folder: task -> (tensor (K, C), metadata). A task name
    (the file's ``task`` metadata, else its file name) must be a valid name: it names a file of every checkpoint."""
    out = {}
    for f in _prompt_files(spec):
        try:
            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensor = fh.get_tensor("prompt")
        except Exception as exc:  # safetensors raises several types for a bad file
            raise ConfigError(f"prompt-tuning: {f} is not a soft-prompt file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(f"prompt-tuning: {f} is not a soft-prompt file (format {meta.get('format')!r})")
        where = f"{f} (metadata 'task')" if "task" in meta else f"{f} (its file name)"
        out[check_name(meta.get("task", f.stem), what="soft prompt task", where=where)] = (tensor, meta)
    return out


def _check_width(model, name: str, tensor: torch.Tensor, spec: str) -> None:
    if tensor.size(-1) != model.config.d_model:
        raise ConfigError(f"prompt-tuning: prompt '{name}' from {spec} is {tensor.size(-1)} wide; this model's "
                          f"embeddings are {model.config.d_model}: it was trained on another base")


def add_prompts(model, *specs: str) -> SoftPrompts:
    """Load the prompts of files, checkpoint or run folders onto ``model`` (frozen), for serving: route rows to
    them with :func:`tuneforge.models.routing.rows`. Returns the model's :class:`SoftPrompts`."""
    sp = model.prefix if isinstance(model.prefix, SoftPrompts) else SoftPrompts(model.config.d_model)
    for spec in specs:
        for name, (tensor, _) in load_prompts(spec).items():
            _check_width(model, name, tensor, spec)
            sp.add(name, tensor.float())
    sp.requires_grad_(False)
    model.prefix = sp.to(model.tok_emb.weight.device)
    return sp


def _saved_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the prompts inside a checkpoint's model file (its ``prefix`` module's tensors)."""
    with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as fh:
        key = "prefix.prompts."
        return {check_name(k[len(key):], what="soft prompt task", where=f"{checkpoint / MODEL_FILE}"):
                tuple(fh.get_slice(k).get_shape()) for k in fh.keys() if k.startswith(key)}


class PromptTuning(DefaultObjective):
    """Soft prompts, one per task, on a frozen model (see the module docstring)."""

    objective_owner = "prompt-tuning"

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
        self.options = options
        self.trained: list[str] = []
        self.module: SoftPrompts | None = None
        self.fingerprint = ""

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

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        if not hasattr(model, "prefix"):
            raise ConfigError("prompt-tuning needs a model with a prefix slot (tuneforge's Transformer); "
                              f"got {type(model).__name__}")
        if model.prefix is not None and not isinstance(model.prefix, SoftPrompts):
            raise ConfigError(f"prompt-tuning: the model's prefix slot already holds {type(model.prefix).__name__}")
        sp = model.prefix if model.prefix is not None else SoftPrompts(model.config.d_model)
        device = model.tok_emb.weight.device
        o = self.options
        if run.checkpoint is not None:  # rebuilding or resuming: the shapes are in the checkpoint, weights follow
            for name, shape in _saved_shapes(run.checkpoint).items():
                if name not in sp.prompts:
                    sp.add(name, torch.zeros(shape))
        else:
            fingerprint = base_fingerprint(model)
            for spec in o.load:
                for name, (tensor, meta) in load_prompts(spec).items():
                    _check_width(model, name, tensor, spec)
                    if meta.get("base") not in (None, fingerprint):
                        run.log(f"prompt-tuning: prompt '{name}' from {spec} was trained on a base of other shapes; "
                                "loading it anyway (same width)")
                    if name in sp.prompts:
                        raise ConfigError(f"prompt-tuning: two prompts named '{name}' (in load= and on the model)")
                    sp.add(name, tensor.float())
        tasks = o.tasks if o.tasks is not None else ([] if o.load else ["default"])
        for name in tasks:
            if name not in sp.prompts:
                sp.add(name, self._new_prompt(model, run, name))
        longest = max((p.size(0) for p in sp.prompts.values()), default=0)
        if longest >= model.config.max_seq_len:
            raise ConfigError(f"prompt-tuning: a prompt of {longest} tokens leaves no room in the model's context of "
                              f"{model.config.max_seq_len}; lower tokens=")
        self.trained = list(tasks)
        sp.active = tuple(tasks[:1]) if len(tasks) == 1 else None
        model.prefix = sp.to(device)
        self.module = sp
        self.fingerprint = base_fingerprint(model)

    @hookimpl
    def tuneforge_trainable_params(self):
        return [self.module.prompts[name] for name in self.trained]

    @hookimpl
    def tuneforge_save(self, run, path):
        folder = Path(path) / PROMPTS_DIR
        folder.mkdir(exist_ok=True)
        meta_base = {"format": FORMAT, "version": "1", "base": self.fingerprint}
        for name, p in self.module.prompts.items():
            check_name(name, what="soft prompt task", where=f"saving {folder}")
            meta = {**meta_base, "task": name, "tokens": str(p.size(0)), "d_model": str(p.size(1))}
            save_file({"prompt": p.detach().cpu().contiguous()}, str(inside(folder, f"{name}.safetensors")),
                      metadata=meta)

    @hookimpl
    def tuneforge_run_start(self, run):
        if self.trained:
            sizes = ", ".join(f"{n} ({self.module.prompts[n].size(0)} tokens)" for n in self.trained)
            run.log(f"prompt-tuning: training {sizes}; every model weight is frozen")

    def objective_reserve(self) -> int:
        return max(p.size(0) for p in self.module.prompts.values())
