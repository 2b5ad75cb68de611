"""The training loop. It knows hooks, not mechanisms: every difference between pretraining, LoRA, RLHF... comes
from the plugins registered for the run (see ``hookspecs.py`` for the contract and its order).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .assemble import assemble, build_model, load_model
from .config import TrainConfig
from .errors import ConfigError, DataError, NonFiniteLossError
from .integrity import frozen_named, weights_digest
from .registry import call_impl
from .run import Run

__all__ = ["train", "TrainResult", "build_model", "load_model", "lr_at"]


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: torch.nn.Module
    metrics: dict[str, float]  # the last step's metrics, with the final evaluation under "eval/..."
    history: list[dict[str, float]]  # every step's metrics
    summary: dict[str, Any]  # also written to out/summary.json
    out: Path | None
    checkpoint: Path | None  # the last checkpoint written, if any
    run: Run


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_device(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


@contextmanager
def _stop_on_signals(run: Run):
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.stop_reason is not None:  # second signal: the user really wants out now
            raise KeyboardInterrupt
        run.request_stop(f"interrupted by {signal.Signals(signum).name}")
        run.summary["signal"] = int(signum)
        run.log(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                "(send it again to abort without saving)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices and embeddings, not biases and norm gains (the usual GPT recipe).
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class _Batches:
    """Micro-batches across epochs, resumable at (epoch, batch_in_epoch)."""

    def __init__(self, run: Run, data_fn, model):
        self.run, self.data_fn, self.model = run, data_fn, model
        self.it = self._open()

    def _open(self):
        batches = call_impl(self.data_fn, run=self.run, model=self.model)
        if batches is None:
            raise DataError("the objective's tuneforge_data returned None: it produced no batches")
        return itertools.islice(iter(batches), self.run.batch_in_epoch, None)

    def next(self):
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


def _evaluate(model, run: Run) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            results = run.hook.tuneforge_evaluate(model=model, run=run)
    finally:
        model.train()
    merged: dict[str, float] = {}
    for r in results:
        merged.update({f"eval/{k}": float(v) for k, v in (r or {}).items()})
    return merged


def _step(run: Run, model, params, optimizer, batches: _Batches, loss_fn) -> tuple[dict[str, float], bool]:
    """One optimizer step over ``grad_accum`` micro-batches; skipped (weights untouched) if anything is not
    finite. Returns the step's metrics and whether it was applied."""
    cfg, t0 = run.config, time.perf_counter()
    lr = lr_at(run.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, float] = {}
    finite = True
    for _ in range(cfg.grad_accum):
        loss, parts = call_impl(loss_fn, model=model, batch=_to_device(batches.next(), run.device), run=run)
        value = float(loss.detach())  # the one host sync per micro-batch: the finiteness test and the log
        if not math.isfinite(value):
            finite = False  # still consume this step's micro-batches, so the data order stays the same
            continue
        (loss / cfg.grad_accum).backward()
        sums["loss"] = sums.get("loss", 0.0) + value
        for k, v in (parts or {}).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    grad_norm = float("nan")
    if finite:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
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


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run one training job as ``config`` describes (keyword arguments override its fields)."""
    cfg = config or TrainConfig()
    if overrides:  # typed, with errors that name the bad keyword
        values = {f: getattr(cfg, f) for f in TrainConfig.fields()}
        cfg = TrainConfig.build({**values, **overrides}, source="tuneforge.train()")
    started = time.perf_counter()
    out = Path(cfg.out) if cfg.out else None
    resume_path = _resume_path(cfg, out) if cfg.resume else None
    built = assemble(cfg, out=out, resume=resume_path)
    reg, run, model, params = built.reg, built.run, built.model, built.params
    mcfg, device = run.model_config, run.device
    optimizer = _optimizer(params, cfg) if params else None
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)

    if resume_path is not None:
        state = ckpt.load_training_state(resume_path, model, optimizer)
        run.step, run.epoch, run.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        run.summary["skipped_steps"] = state.get("skipped_steps", 0)
        run.resumed_from = resume_path
        reg.hook.tuneforge_load(run=run, path=resume_path)
    elif out is not None and ckpt.find_latest(out) is not None:
        raise ConfigError(
            f"{out} already holds a run (latest: {ckpt.find_latest(out).name}); pass --resume auto to continue "
            "it, or choose another --out. Nothing was changed."
        )
    # Reads and validates the data before anything is written.
    batches = _Batches(run, reg.objective_impl("tuneforge_data"), model) if params else None
    loss_fn = reg.objective_impl("tuneforge_loss")
    frozen = frozen_named(model) if cfg.verify_frozen else []
    frozen_before = weights_digest(frozen) if frozen else None

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(out)
        config_json = {"train": cfg.to_dict(), "model_config": mcfg.to_dict(), "mechanisms": reg.options(),
                       "lineage": built.lineage()}
        (out / "config.json").write_text(json.dumps(config_json, indent=2, default=str))
    run.summary.update(
        mechanisms=reg.mechanisms, plugins=list(reg.plugins), trainable_params=n_train, total_params=total,
        trainable_pct=100.0 * n_train / max(1, total), device=str(device), objective=reg.objective,
        trainable_by_plugin=dict(run.trainable),
    )
    reg.hook.tuneforge_run_start(run=run, model=model)

    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    last_ckpt: Path | None = run.resumed_from
    nonfinite_streak = 0

    def save() -> Path | None:
        nonlocal last_ckpt
        if out is None or not run.is_main:
            return None
        state = {
            "step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
            "skipped_steps": run.summary.get("skipped_steps", 0), "model_config": mcfg.to_dict(),
            "mechanisms": reg.options(), "lineage": built.lineage(), "train": cfg.to_dict(),
            "tokenizer": run.tokenizer.name,
        }
        last_ckpt = ckpt.save_checkpoint(
            out, run.step, model, optimizer, state,
            write_plugins=lambda path: reg.hook.tuneforge_save(run=run, path=path, model=model),
            keep_last=cfg.keep_last,
        )
        return last_ckpt

    model.train()
    with _stop_on_signals(run):
        while batches is not None and run.step < cfg.steps and run.stop_reason is None:
            metrics, finite = _step(run, model, params, optimizer, batches, loss_fn)
            nonfinite_streak = 0 if finite else nonfinite_streak + 1
            run.summary["skipped_steps"] = run.summary.get("skipped_steps", 0) + (not finite)
            if nonfinite_streak >= cfg.max_nonfinite:
                run.summary["status"] = "stopped: non-finite loss"
                _finish(run, model, started, out)
                raise NonFiniteLossError(
                    f"the loss or gradient was not finite for {nonfinite_streak} steps in a row (up to step "
                    f"{run.step}); stopped. Skipped steps never update the weights, so the last good checkpoint "
                    f"({last_ckpt or 'none written'}) is intact. Lower --lr, check the data, or raise --max-nonfinite."
                )
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                metrics.update(_evaluate(model, run))
            # Not during a non-finite streak: a checkpoint there would make a resume replay the streak.
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps and not nonfinite_streak:
                save()
            history.append(metrics)
            reg.hook.tuneforge_step_end(run=run, step=run.step, metrics=metrics)

    if run.step > 0 or run.stop_reason is None:  # nothing to evaluate after an interrupt before step 1
        final_eval = _evaluate(model, run)
        metrics = {**metrics, **final_eval}
        run.summary["eval"] = final_eval
    if frozen:
        _record_frozen(run, frozen, frozen_before)
    if out is not None and params and (last_ckpt is None or last_ckpt.name != f"step-{run.step:08d}"):
        save()
    run.summary["status"] = run.stop_reason or "completed"
    run.summary["checkpoint"] = str(last_ckpt) if last_ckpt else None
    _finish(run, model, started, out)
    return TrainResult(model, metrics, history, run.summary, out, last_ckpt, run)


def _finish(run: Run, model, started: float, out: Path | None) -> None:
    run.summary.update(steps=run.step, seconds=round(time.perf_counter() - started, 3))
    run.hook.tuneforge_run_end(run=run, model=model, summary=run.summary)
    if out is not None and run.is_main:
        ckpt.atomic_write_text(out / "summary.json", json.dumps(run.summary, indent=2, default=str))


def _record_frozen(run: Run, frozen, before: str) -> None:
    """Hash the frozen weights again and say in the summary whether they are bit-for-bit what they were."""
    after = weights_digest(frozen)
    run.summary["frozen_weights"] = {
        "tensors": len(frozen), "values": sum(t.numel() for _, t in frozen), "sha256_before": before,
        "sha256_after": after, "unchanged": after == before,
    }
    if after != before:
        run.log("WARNING: weights that were frozen for this run changed (their SHA-256 differs before and after); "
                "a plugin wrote into them. See frozen_weights in summary.json.")


def _resume_path(cfg: TrainConfig, out: Path | None) -> Path | None:
    if cfg.resume == "auto":
        if out is None:
            raise ConfigError("--resume auto needs --out (the run folder to continue)")
        # "auto" is the same command for the first launch and every restart of a preemptible job.
        return ckpt.find_latest(out)
    return ckpt.resolve_checkpoint(cfg.resume)
