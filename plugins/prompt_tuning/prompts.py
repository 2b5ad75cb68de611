"""Soft prompts: :class:`SoftPrompts`, the module in a model's ``prefix`` slot, and the files that hold them.

A soft prompt on disk is one small safetensors file, ``prompts/<task>.safetensors`` in every checkpoint: the tensor
``prompt`` (K, C) and string metadata ``format`` (``tuneforge.soft-prompt``), ``version``, ``base`` (the fingerprint
of the base it was trained on), ``task``, ``tokens`` and ``d_model``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.sdk import MODEL_FILE, ConfigError, Prefix, TaskModule, check_name, inside

__all__ = ["SoftPrompts", "FORMAT", "PROMPTS_DIR", "TENSOR", "read_prompt", "write_prompt", "saved_shapes",
           "check_width"]

FORMAT = "tuneforge.soft-prompt"
PROMPTS_DIR = "prompts"
TENSOR = "prompt"  # the one tensor of a prompt file


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
    def max_length(self) -> int:
        """The longest prompt's tokens: positions objectives keep free in the model's context."""
        return max((p.size(0) for p in self.prompts.values()), default=0)

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


def read_prompt(path: Path) -> tuple[str, dict, torch.Tensor]:
    """(task, metadata, prompt (K, C)) of a soft-prompt file. The task is the ``task`` metadata, else the file's
    name, and must be a valid name: it names a file of every later checkpoint."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensor = fh.get_tensor(TENSOR)
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ConfigError(f"prompt-tuning: {path} is not a soft-prompt file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"prompt-tuning: {path} is not a soft-prompt file (format {meta.get('format')!r})")
    where = f"{path} (metadata 'task')" if "task" in meta else f"{path} (its file name)"
    return check_name(meta.get("task", path.stem), what="soft prompt task", where=where), meta, tensor


def write_prompt(folder: Path, name: str, prompt: torch.Tensor, *, base: str) -> Path:
    """Write ``prompt`` (K, C) as ``folder/<name>.safetensors``; ``base`` is the fingerprint of the base model."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    meta = {"format": FORMAT, "version": "1", "base": base, "task": name, "tokens": str(prompt.size(0)),
            "d_model": str(prompt.size(1))}
    path = inside(folder, f"{name}.safetensors")
    save_file({TENSOR: prompt.detach().cpu().contiguous()}, str(path), metadata=meta)
    return path


def saved_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the prompts inside a checkpoint's model file (its ``prefix`` module's tensors): what a rebuild
    re-creates before the weights load, so it needs nothing but the model file."""
    with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as fh:
        key = "prefix.prompts."
        return {check_name(k[len(key):], what="soft prompt task", where=f"{checkpoint / MODEL_FILE}"):
                tuple(fh.get_slice(k).get_shape()) for k in fh.keys() if k.startswith(key)}


def check_width(model, name: str, prompt: torch.Tensor, where) -> None:
    if prompt.size(-1) != model.config.d_model:
        raise ConfigError(f"prompt-tuning: prompt '{name}' from {where} is {prompt.size(-1)} wide; this model's "
                          f"embeddings are {model.config.d_model}: it was trained on another base")
