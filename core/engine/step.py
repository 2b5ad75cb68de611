"""One optimizer step: the learning-rate schedule, the optimizer, the micro-batch stream and the step itself.

The engine's loop calls :func:`step` once per optimizer step. Under torchrun every rank draws the same stream
of micro-batches and trains on its own share of it (see :mod:`tuneforge.engine.distributed`).
"""
from __future__ import annotations

import itertools
import math
import time

import torch

from tuneforge.engine import precision
from tuneforge.engine.config import TrainConfig
from tuneforge.engine.muon import MuonWithAdamW, hidden_matrices
from tuneforge.errors import ConfigError, DataError
from tuneforge.engine.registry import call_impl, takes

__all__ = ["lr_at", "make_optimizer", "check_resumable", "Batches", "step"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, model: torch.nn.Module | None = None):
    """The run's optimizer (``--optimizer``) over ``params``: AdamW, or Muon on ``model``'s hidden matrices with
    AdamW on the rest (:mod:`tuneforge.engine.muon`)."""
    # Decay matrices and embeddings, not biases and norm gains (the usual GPT recipe).
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    adamw = dict(betas=(cfg.beta1, cfg.beta2), fused=_fusable(params) or None)
    if cfg.optimizer == "muon":
        if any(hasattr(p, "device_mesh") for p in params):  # FSDP2's DTensor shards
            raise ConfigError("--optimizer muon does not run under --strategy fsdp: torch's Muon orthogonalises whole "
                              "matrices and FSDP2 holds shards of them. Use --strategy ddp, or --optimizer adamw.")
        hidden = hidden_matrices(model) if model is not None else set()
        groups = [{"params": [p for p in decay if id(p) not in hidden], "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return MuonWithAdamW([p for p in decay if id(p) in hidden], [g for g in groups if g["params"]], lr=cfg.lr,
                             weight_decay=cfg.weight_decay, adamw_kwargs=adamw)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, **adamw)


def check_resumable(saved: dict, cfg: TrainConfig, path) -> None:
    """Refuse to resume the checkpoint at ``path`` (its saved train config ``saved``) with another --optimizer."""
    was = saved.get("optimizer", "adamw")  # checkpoints made before --optimizer trained with AdamW
    if saved and was != cfg.optimizer:
        raise ConfigError(f"--resume {path}: it trained with --optimizer {was}, not {cfg.optimizer}, and one's state "
                          f"cannot continue the other: resume with --optimizer {was}, or --init {path} (a fresh "
                          "optimizer). Nothing was changed.")


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """AdamW's fused kernel: one pass over each tensor instead of about ten. On a CPU torch's default is a loop
    of separate ops per parameter, a tenth of a small model's step (the tiny model: ~8 ms of ~100); on a GPU it
    replaces the foreach kernels. Plain floating-point tensors on a CPU or CUDA device only: sharded (FSDP2's
    DTensor) and other parameters keep torch's default."""
    return bool(params) and all(type(p) in (torch.nn.Parameter, torch.Tensor) and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def _to_device(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


class Batches:
    """Micro-batches across epochs, resumable at (epoch, batch_in_epoch), shared out over ranks.

    ``run.batch_in_epoch`` counts the micro-batches of the stream consumed by all ranks together, so it is the
    same number on every rank and a checkpoint resumes the stream exactly.
    """

    def __init__(self, run, data_fn, model, parallel):
        self.run, self.data_fn, self.model, self.parallel = run, data_fn, model, parallel
        # Objectives that make their data with the model (rollouts) need its full weights while they do.
        self.uses_model = "model" in takes(data_fn)
        self.it = self._open()

    def _open(self):
        batches = call_impl(self.data_fn, run=self.run, model=self.model)
        if batches is None:
            raise DataError("the objective's tuneforge_data returned None: it produced no batches")
        return itertools.islice(iter(batches), self.run.batch_in_epoch, None)

    def _draw(self):
        batch = next(self.it, None)
        if batch is None:  # epoch exhausted: the next one, in its own order
            self.run.epoch += 1
            self.run.batch_in_epoch = 0
            self.it = self._open()
            batch = next(self.it, None)
            if batch is None:
                raise DataError(
                    f"the data yields no batch in epoch {self.run.epoch}: fewer records than one batch? "
                    f"Lower --batch-size (now {self.run.config.batch_size}) or add data."
                )
        self.run.batch_in_epoch += 1
        return batch

    def next(self):
        """This rank's next micro-batch: one of the next ``world_size`` of the stream."""
        par = self.parallel
        if not self.uses_model:
            drawn = [self._draw() for _ in range(par.world_size)]
            return drawn[par.rank]
        # Data made with the model (rollouts and their log-probs) runs in the precision the loss runs in: PPO's
        # ratio of new to old log-probs then starts at 1 instead of at the gap between bfloat16 and float32.
        with par.gathered(self.model), precision.autocast(self.run.config.precision, self.run.device):
            drawn = [self._draw() for _ in range(par.world_size)]
        return drawn[par.rank]


def step(run, params, optimizer, batches: Batches, parallel) -> tuple[dict[str, float], bool]:
    """One optimizer step over ``grad_accum`` micro-batches per rank; skipped (weights untouched) on every rank if
    anything was not finite on any. Returns the step's metrics (averaged over ranks) and whether it was applied."""
    cfg, t0 = run.config, time.perf_counter()
    lr = lr_at(run.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, float] = {}
    finite = True
    for i in range(cfg.grad_accum):
        batch = _to_device(batches.next(), run.device)
        with parallel.accumulate(last=i == cfg.grad_accum - 1):
            loss, parts = parallel.loss(batch)
            value = float(loss.detach())  # the one host sync per micro-batch: the finiteness test and the log
            if not math.isfinite(value):
                finite = False
                if not parallel.distributed:  # the step will be skipped; spare the backward
                    continue
            # Under torchrun every rank runs every backward even after a non-finite loss: the gradient all-reduce
            # needs all of them, and the NaN it spreads makes every rank skip the same step.
            (loss / cfg.grad_accum).backward()
        if math.isfinite(value):
            sums["loss"] = sums.get("loss", 0.0) + value
            for k, v in (parts or {}).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    grad_norm = float("nan")
    sums, finite = parallel.reduce(sums, finite)
    if finite:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    seconds = time.perf_counter() - t0
    tokens = sums.pop("tokens", 0.0)
    metrics = {k: v / cfg.grad_accum for k, v in sums.items()}
    metrics.update(lr=lr, grad_norm=grad_norm, skipped=float(not finite), step_seconds=seconds)
    if tokens:
        metrics.update(tokens=tokens, tokens_per_s=tokens / seconds)
    return metrics, finite
