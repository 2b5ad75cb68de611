"""Activation checkpointing: blocks whose activations are recomputed in the backward instead of kept.

:func:`apply` marks every N-th block of ``model.blocks``, counting from the first (blocks 0, N, 2N...), so
``every:N`` checkpoints at least one block whatever the depth. A marked block in training mode, with gradients
on and no KV cache, runs its forward under ``torch.utils.checkpoint`` (non-reentrant): of everything the block
computes only its inputs stay alive until the backward, which runs the forward again to get the rest. The
activations held fall from every block's to each checkpointed block's input plus one block's, at the price of a
second forward of those blocks.

Both kinds of model take the same two attributes, those of transformers' ``GradientCheckpointingLayer``:
``gradient_checkpointing`` (on or off) and ``_gradient_checkpointing_func`` (how to run the block). Hugging Face
decoder layers (transformers 5) checkpoint their own ``forward`` when both are set; the embedded model's blocks
do the same through :class:`Checkpointable`. Either way the checkpoint sits inside ``forward``, so module
hooks on the block (FSDP2's all-gather and reshard) run once and stay out of the recompute; hooks on its
sub-layers (adapters) run again with it.

What the recompute must see as the first forward did:

- random draws (dropout): ``checkpoint`` saves the RNG state with the inputs and restores it (its default);
- per-row routing (:mod:`tuneforge.models.routing`): a context variable, which the caller's ``rows(...)`` block
  has reset by the time the backward runs. It is captured when the block runs and re-entered around the
  recompute (``context_fn``), so LoRA, adapters and routed parts select the same parts for the same rows.
  The parts chosen model-wide (``tuneforge.parts.modules.set_active``) are read again at the recompute: change
  them between a forward and its backward and the recompute differs (``checkpoint`` then raises, most often).

A KV cache is written in place, so an embedded block given one is never recomputed. Transformers' layers
instead drop a cache they are given while checkpointing; tuneforge passes one only without gradients
(generation), where nothing is checkpointed.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from tuneforge.errors import ConfigError
from tuneforge.models import routing

__all__ = ["apply", "recompute", "Checkpointable"]


def _contexts():
    """(around the first forward, around the recompute): called by ``checkpoint`` when the block runs, so
    ``carried()`` captures the routing of that forward."""
    return contextlib.nullcontext(), routing.carried()


def recompute(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` keeping only its inputs for the backward, which calls ``fn`` again.

    Non-reentrant: gradients reach parameters whatever the inputs (frozen embeddings, keyword arguments), and
    it composes with DDP and FSDP2."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


class Checkpointable:
    """A block that :func:`apply` can checkpoint: its ``forward`` runs its work through :meth:`checkpointed`.

    The attributes are transformers' names (``GradientCheckpointingLayer``), so one :func:`apply` sets both kinds.
    """

    gradient_checkpointing: bool = False
    _gradient_checkpointing_func = None

    def checkpointed(self, fn, *args):
        """``fn(*args)``, under checkpointing when this block is marked and a backward will follow (training
        mode, gradients on): in eval or under ``no_grad`` there is nothing to save memory for."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)


def apply(model: torch.nn.Module, every: int) -> list[int]:
    """Checkpoint every ``every``-th block of ``model.blocks`` (0, every, 2 * every...; ``every`` 0: none) and
    switch the others off. Returns the indices of the checkpointed blocks (the run's summary records them).

    :raises ConfigError: ``every`` > 0 and the model has no blocks, or blocks that cannot be checkpointed.
    """
    if every < 0:
        raise ValueError(f"every must be 0 (none) or more, got {every}")
    blocks = list(getattr(model, "blocks", None) or [])
    chosen = [i for i in range(len(blocks)) if every and i % every == 0]
    if every and not blocks:
        raise ConfigError(f"--checkpointing: this {type(model).__name__} has no blocks (model.blocks) to "
                          "checkpoint; use --checkpointing none")
    if chosen:
        unable = next((b for b in blocks if not hasattr(type(b), "gradient_checkpointing")), None)
        if unable is not None:
            raise ConfigError(
                f"--checkpointing: this model's blocks ({type(unable).__name__}) cannot recompute their "
                "activations; tuneforge checkpoints the embedded model's blocks and Hugging Face decoder layers "
                "of transformers 5 (GradientCheckpointingLayer). Use --checkpointing none")
    for i, block in enumerate(blocks):
        on = i in chosen
        if on or hasattr(type(block), "gradient_checkpointing"):
            block.gradient_checkpointing = on
        if on:
            block._gradient_checkpointing_func = recompute
    return chosen
