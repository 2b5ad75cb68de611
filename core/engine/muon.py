"""``--optimizer muon``: torch's Muon on the hidden weight matrices, AdamW on every other parameter, as one optimizer.

Muon (Jordan et al., 2024) orthogonalises each matrix's momentum (five Newton-Schulz iterations) before the update,
so every direction of the matrix moves at the same rate. It is meant for the 2-D weights inside the network; the
embeddings, the output head (which are lookups and a readout, not maps between hidden states), norm gains and biases
train with AdamW, as its authors and torch's documentation prescribe. The update is torch's own
(:class:`torch.optim.Muon`, ``adjust_lr_fn="match_rms_adamw"``): its step is scaled to the RMS of an AdamW step, so
one ``--lr``, warmup and cosine schedule drive both halves and ``--weight-decay`` means the same to both.

Which parameters are hidden matrices is read from the model's structure: the weights of its ``nn.Linear`` layers,
less any that is, or is tied to, an embedding or the output head (``get_output_embeddings()``, or ``lm_head``).
A layer a mechanism adds (a classification head, adapter projections) is a linear layer too, and trains with Muon.

The pair is one object to the engine: one list of parameter groups for the schedule, one ``state_dict`` in torch's
format (the two halves' parameters numbered one after the other) for checkpoints and ``--resume``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MuonWithAdamW", "hidden_matrices"]


def hidden_matrices(model: nn.Module) -> set[int]:
    """``id`` of every hidden weight matrix of ``model`` (see the module docstring)."""
    readout = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    readout = readout if readout is not None else getattr(model, "lm_head", None)
    lookups = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    if isinstance(readout, nn.Module):
        lookups |= {id(p) for p in readout.parameters(recurse=False)}
    return {id(m.weight) for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.dim() == 2 and id(m.weight) not in lookups}


class MuonWithAdamW:
    """Muon on ``hidden`` parameters, AdamW (``adamw_kwargs``) on ``rest``; see the module docstring."""

    def __init__(self, hidden: list[nn.Parameter], rest: list[dict], *, lr: float, weight_decay: float,
                 adamw_kwargs: dict):
        self.parts: list[torch.optim.Optimizer] = []
        if hidden:
            self.parts.append(torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay,
                                               adjust_lr_fn="match_rms_adamw"))
        if rest:
            self.parts.append(torch.optim.AdamW(rest, lr=lr, **adamw_kwargs))

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.parts for p, s in opt.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def state_dict(self) -> dict:
        """torch's format over both halves: Muon's parameters first, numbered 0..n-1, then AdamW's."""
        out, offset = {"state": {}, "param_groups": []}, 0
        for opt in self.parts:
            sd = opt.state_dict()
            out["state"].update({offset + int(i): s for i, s in sd["state"].items()})
            out["param_groups"] += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return out

    def load_state_dict(self, state: dict) -> None:
        groups = list(state["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer state has {len(groups)} parameter groups; Muon with AdamW here has "
                             f"{len(self.param_groups)}")
        offset = 0
        for opt in self.parts:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            n = sum(len(g["params"]) for g in mine)
            opt.load_state_dict({
                "state": {int(i) - offset: s for i, s in state["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += n
