"""IA³ from Python, outside a training run: add new vectors, load saved ones, fold them into the weights."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .files import read_ia3
from .placement import ROLES, _set_module, ia3_layers, install, plan, points_for, vectors

__all__ = ["add_ia3", "load_ia3", "merge"]


def add_ia3(model: nn.Module, *, targets: Sequence[str] = ROLES, layers: Sequence[str] = ("all",),
            init: float = 1.0) -> list[nn.Parameter]:
    """Put new IA³ vectors (every entry ``init``; 1 leaves the output unchanged) on ``targets`` of blocks ``layers``
    of ``model``; returns them. Options as for ``ia3:`` runs."""
    return vectors(model, install(model, plan(model, list(targets), list(layers)), init=init))


def load_ia3(model: nn.Module, spec: str, *, trainable: bool = False) -> list[nn.Parameter]:
    """Put the vectors saved at ``spec`` (an IA³ folder, or a checkpoint / run folder with ``ia3/``) onto
    ``model``, frozen unless ``trainable``; returns them. Every point is checked against the model first."""
    tensors, _, folder = read_ia3(spec)
    points = points_for(model, {k: tuple(t.shape) for k, t in tensors.items()}, where=str(folder))
    found = vectors(model, install(model, points, where=str(folder)))
    with torch.no_grad():
        for vector, p in zip(found, points):
            vector.copy_(tensors[p.name])
            vector.requires_grad_(trainable)
    return found


def merge(model: nn.Module) -> list[str]:
    """Fold every IA³ layer of ``model`` into its weights: each becomes a plain ``nn.Linear`` again (new weight
    tensors; the old ones are left as they were), and forwards cost what the base model's do. Returns the paths.
    There is no unmerge: keep the checkpoint (``tuneforge.load_model``) for the vectors."""
    done = []
    for path, layer in ia3_layers(model):
        _set_module(model, path, layer.merged())
        done.append(path)
    return done
