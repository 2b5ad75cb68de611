"""The training loop. It knows hooks, not mechanisms: every difference between pretraining, LoRA, RLHF... comes
from the plugins registered for the run (see ``hookspecs.py`` for the contract and its order).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine import distributed, precision
from tuneforge.engine.assemble import Assembled, assemble, build_model, load_model
from tuneforge.engine.config import TrainConfig
from tuneforge.errors import CheckpointError, ConfigError, NonFiniteLossError
from tuneforge.engine.integrity import frozen_named
from tuneforge.engine.run import Run, say
from tuneforge.engine.runfolder import RunFolder, write_error, write_text
from tuneforge.engine.step import Batches, check_resumable, lr_at, make_optimizer, step

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


@contextmanager
def _stop_on_signals(run: Run):
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first: list[float] = []
    # torchrun hands a terminal's Ctrl-C on to workers that got it from the terminal already: one press arrives
    # twice within a moment. A single process gets each press once, so every second signal aborts there.
    echo = 1.0 if distributed.launched() else 0.0

    def handler(signum, frame):
        if first:
            if time.monotonic() - first[0] < echo:
                return
            raise KeyboardInterrupt  # a second signal: the user really wants out now
        first.append(time.monotonic())
        run.request_stop(f"interrupted by {signal.Signals(signum).name}", kind="signal")
        run.summary["signal"] = int(signum)
        run.log(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                "(send it again to abort without saving)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _evaluate(model, run: Run, par: distributed.Parallel) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad(), par.gathered(model), precision.autocast(run.config.precision, run.device):
            results = run.hook.tuneforge_evaluate(model=model, run=run)
    finally:
        model.train()
    merged: dict[str, float] = {}
    for r in results:
        merged.update({f"eval/{k}": float(v) for k, v in (r or {}).items()})
    return merged


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run one training job as ``config`` describes (keyword arguments override its fields). Under torchrun each
    process calls it; they train together (see :mod:`tuneforge.engine.distributed`) and rank 0 writes the files."""
    cfg = config or TrainConfig()
    if overrides:  # typed, with errors that name the bad keyword
        values = {f: getattr(cfg, f) for f in TrainConfig.fields()}
        cfg = TrainConfig.build({**values, **overrides}, source="tuneforge.train()")
    par = distributed.start(cfg.strategy, cfg.device)
    try:
        result = _train(cfg, par)
    except BaseException:
        par.close(together=False)  # the other ranks may never reach the closing barrier; torchrun ends them
        raise
    par.close()
    return result


def _train(cfg: TrainConfig, par: distributed.Parallel) -> TrainResult:
    """Hold the run folder (rank 0 writes it) for the whole run; a run that created it and fails before saving
    anything removes it again, so a refused command leaves nothing behind."""
    out = Path(cfg.out) if cfg.out else None
    folder = RunFolder(out, log=say) if out is not None and par.rank == 0 else None
    if folder is not None:
        folder.acquire()
    try:
        result = _run(cfg, par, out, owner=folder is not None)
    except BaseException as exc:
        if folder is not None:
            # A NaN stop or an abort keeps what it wrote (its summary, its metrics) to look at.
            keep = isinstance(exc, (NonFiniteLossError, KeyboardInterrupt)) or bool(ckpt.list_checkpoints(out))
            folder.release(undo=not keep)
        if isinstance(exc, (OSError, SafetensorError)) and _disk_error(exc):
            raise write_error(getattr(exc, "filename", None) or out, exc, "into the run folder") from None
        raise
    if folder is not None:
        folder.release()
    return result


def _disk_error(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in _DISK or any(f"os error {e})" in str(exc) for e in _DISK)


# Errors that only a write can meet (a permission error may come from reading input, and is said there).
_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclasses.dataclass
class _Loop:
    """What the parts of one run share: the assembled model, its optimizer and data, and the record so far."""

    cfg: TrainConfig
    par: distributed.Parallel
    out: Path | None
    built: Assembled  # registry, run, model, and the parameters that train (sharded ones under FSDP)
    optimizer: torch.optim.Optimizer | None
    batches: Batches | None  # None when nothing trains
    started: float  # perf_counter() when the run began, for summary["seconds"]
    frozen: list  # (name, tensor) of the frozen weights when --verify-frozen, else empty
    frozen_before: str | None  # their digest before the first step
    last_ckpt: Path | None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    nonfinite_streak: int = 0


def _run(cfg: TrainConfig, par: distributed.Parallel, out: Path | None, owner: bool) -> TrainResult:
    loop = _setup(cfg, par, out, owner)
    run = loop.built.run
    loop.built.model.train()
    with _stop_on_signals(run):
        _steps(loop)
        if run.stop_reason is None:
            run.stop_reason = "steps"
        # Still under the handlers: a signal now asks for what is already happening, and a second one aborts.
        _end(loop)
    return TrainResult(loop.built.model, loop.metrics, loop.history, run.summary, out, loop.last_ckpt, run)


def _setup(cfg: TrainConfig, par: distributed.Parallel, out: Path | None, owner: bool) -> _Loop:
    """Assemble the model, resume it (or make sure a fresh run overwrites nothing), read the data, and record in
    config.json and the summary what runs, before the first step."""
    started = time.perf_counter()
    if out is not None and owner:
        ckpt.clean_stale(out)  # what a kill while saving or rotating left
    # (checkpoint folder, its state.json): read once, here, for everything resuming needs
    resume_path, resume_state = _resume_from(cfg, out, owner) if cfg.resume else (None, None)
    if resume_state is not None:  # options left to the engine keep what the checkpoint's run chose
        saved = resume_state.get("train") or {}
        cfg = cfg.replace(**{k: saved[k] for k in _ENGINE_CHOSEN if getattr(cfg, k) is None and saved.get(k) is not None})
    built = assemble(cfg, out=out, resume=resume_path, parallel=par)
    reg, run, model = built.reg, built.run, built.model
    cfg = run.config  # with the defaults sized to the model (engine/defaults.py)
    if resume_path is not None:
        _resume_changes(resume_path, resume_state, cfg, run)
    # Before a checkpoint loads (float32 weights load into float32 master weights) and the optimizer is made.
    precision.prepare_run(model, run, resumed=resume_state)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in built.params)
    if resume_path is not None:
        ckpt.load_weights(resume_path, model, state=resume_state)  # into the whole model, before FSDP shards it
    loss_fn = reg.objective_impl("tuneforge_loss")
    params = par.wrap(model, loss_fn, run) if built.params else []
    built.params = params  # FSDP replaced the parameters: no reference may keep the unsharded ones alive
    optimizer = make_optimizer(params, cfg, model) if params else None
    if resume_path is not None:
        _resume_state(resume_path, resume_state, built, par, optimizer)
    elif out is not None and ckpt.list_checkpoints(out):  # damaged ones too: a fresh run would overwrite them
        raise ConfigError(
            f"{out} already holds a run (latest: {ckpt.list_checkpoints(out)[-1].name}); pass --resume auto to "
            "continue it, or choose another --out. Nothing was changed."
        )
    elif par.rank:  # dropout draws differ between ranks; rank 0 keeps the stream a single process has
        torch.manual_seed(cfg.seed * 1_000_003 + par.rank)
    # Reads and validates the data before anything is written.
    batches = Batches(run, reg.objective_impl("tuneforge_data"), model, par) if params else None
    frozen = frozen_named(model) if cfg.verify_frozen else []
    frozen_before = par.digest(frozen) if frozen else None
    loop = _Loop(cfg, par, out, built, optimizer, batches, started, frozen, frozen_before, run.resumed_from)
    _record_start(loop, n_train, total)
    return loop


def _resume_state(path: Path, saved: dict, built: Assembled, par: distributed.Parallel, optimizer) -> None:
    """The counters, optimizer state, random streams and plugins' own state of the checkpoint at ``path``
    (``saved``: its state.json)."""
    run = built.run
    state, optimizer_state, rng = ckpt.load_training_state(path, state=saved)
    if optimizer is not None and optimizer_state is not None:
        par.load_optimizer_state(optimizer, optimizer_state)
    par.set_rng(rng)
    run.step, run.epoch, run.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    run.summary["skipped_steps"] = state.get("skipped_steps", 0)
    run.resumed_from = path
    built.reg.hook.tuneforge_load(run=run, path=path)


def _record_start(loop: _Loop, n_train: int, total: int) -> None:
    """config.json, the summary's description of the run, then the plugins' tuneforge_run_start."""
    cfg, par, out, built = loop.cfg, loop.par, loop.out, loop.built
    reg, run, model = built.reg, built.run, built.model
    if out is not None and run.is_main:
        config_json = {"train": cfg.to_dict(), "model_config": run.model_config.to_dict(), "mechanisms": reg.options(),
                       "lineage": built.lineage(), "plugin_classes": built.plugin_classes()}
        write_text(out / "config.json", json.dumps(config_json, indent=2, default=str))
    run.summary.update(
        mechanisms=reg.mechanisms, plugins=list(reg.plugins), trainable_params=n_train, total_params=total,
        trainable_pct=100.0 * n_train / max(1, total), device=str(run.device), objective=reg.objective,
        trainable_by_plugin=dict(run.trainable),
    )
    if par.distributed:
        run.summary.update(strategy=par.strategy, world_size=par.world_size)
    with par.gathered(model):  # whole weights for plugins that look at them (FSDP shards them)
        reg.hook.tuneforge_run_start(run=run, model=model)


def _steps(loop: _Loop) -> None:
    """Train until --steps, a stop request on any rank, or too many non-finite steps in a row (which raises)."""
    cfg, par, built = loop.cfg, loop.par, loop.built
    run, model = built.run, built.model
    while loop.batches is not None and run.step < cfg.steps and not _stopping(run, par):
        loop.metrics, finite = step(run, built.params, loop.optimizer, loop.batches, par)
        loop.nonfinite_streak = 0 if finite else loop.nonfinite_streak + 1
        run.summary["skipped_steps"] = run.summary.get("skipped_steps", 0) + (not finite)
        if loop.nonfinite_streak >= cfg.max_nonfinite:
            run.stop_reason, run.stop_message = "non-finite", "stopped: non-finite loss"
            run.summary["status"] = run.stop_message
            with par.gathered(model):
                _finish(run, model, loop.started, loop.out)
            raise NonFiniteLossError(
                f"the loss or gradient was not finite for {loop.nonfinite_streak} steps in a row (up to step "
                f"{run.step}); stopped. Skipped steps never update the weights, so the last good checkpoint "
                f"({loop.last_ckpt or 'none written'}) is intact. Lower --lr, check the data, or raise --max-nonfinite."
            )
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
            loop.metrics.update(_evaluate(model, run, par))
        # Not during a non-finite streak: a checkpoint there would make a resume replay the streak.
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps and not loop.nonfinite_streak:
            _save(loop)
        loop.history.append(loop.metrics)
        built.reg.hook.tuneforge_step_end(run=run, step=run.step, metrics=loop.metrics)


def _end(loop: _Loop) -> None:
    """The last checkpoint, the final evaluation, the frozen-weights check and summary.json."""
    par, out, built = loop.par, loop.out, loop.built
    run, model = built.run, built.model
    # The checkpoint comes first, so a scheduler's SIGTERM during the final evaluation loses nothing.
    if out is not None and built.params and (loop.last_ckpt is None or loop.last_ckpt.name != f"step-{run.step:08d}"):
        _save(loop)
    if run.step > 0 or run.stop_reason == "steps":  # nothing to evaluate after an interrupt before step 1
        final_eval = _evaluate(model, run, par)
        loop.metrics = {**loop.metrics, **final_eval}
        run.summary["eval"] = final_eval
    if loop.frozen:
        _record_frozen(run, par.digest(frozen_named(model)), loop.frozen, loop.frozen_before)
    run.summary["model_state_mib_per_process"] = round(par.state_bytes(model, loop.optimizer) / 2**20, 2)
    run.summary["status"] = "completed" if run.stop_reason == "steps" else run.stop_message or run.stop_reason
    run.summary["checkpoint"] = str(loop.last_ckpt) if loop.last_ckpt else None
    with par.gathered(model):
        _finish(run, model, loop.started, out)


def _save(loop: _Loop) -> Path | None:
    """Every rank comes here (FSDP gathers the shards for rank 0); rank 0 writes. Sets and returns last_ckpt."""
    cfg, par, out, built = loop.cfg, loop.par, loop.out, loop.built
    reg, run, model = built.reg, built.run, built.model
    if out is None:
        return None
    with par.gathered(model):  # FSDP: the shards gathered, so plugins and rank 0 write whole tensors
        optim = par.optimizer_state(loop.optimizer) if loop.optimizer is not None else None
        rng = par.rng_states()
        if run.is_main:
            state = {
                "step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
                "skipped_steps": run.summary.get("skipped_steps", 0), "model_config": run.model_config.to_dict(),
                "mechanisms": reg.options(), "lineage": built.lineage(), "plugin_classes": built.plugin_classes(),
                "train": cfg.to_dict(),
                "tokenizer": run.tokenizer.name, "world_size": par.world_size,
            }
            try:
                loop.last_ckpt = ckpt.save_checkpoint(
                    out, run.step, model, optim, state,
                    write_plugins=lambda path: reg.hook.tuneforge_save(run=run, path=path, model=model),
                    keep_last=cfg.keep_last, folder=par.folder_weights(), rng=rng,
                )
            except (OSError, SafetensorError) as exc:  # nothing half-written: the old latest stands
                kept = f"the last complete one is {loop.last_ckpt}" if loop.last_ckpt else "no checkpoint was written"
                raise CheckpointError(f"{write_error(out, exc, 'the checkpoint of step %d into' % run.step)} "
                                      f"({kept})") from None
        par.barrier()  # the others go on once the checkpoint is complete
    if not run.is_main:
        loop.last_ckpt = out / f"step-{run.step:08d}"
    return loop.last_ckpt


def _stopping(run: Run, par: distributed.Parallel) -> bool:
    """Whether to stop before the next step: asked for on any rank (a signal, a plugin), so all stop together, and
    for the same ``stop_reason`` (a signal on any rank makes it ``"signal"`` on all)."""
    if not par.any(run.stop_reason is not None):
        return False
    signalled = par.any(run.stop_reason == "signal")  # every rank asks: the first answer was the same on all
    if run.stop_reason is None or (signalled and run.stop_reason != "signal"):
        run.stop_reason, run.stop_message = ("signal" if signalled else "early-stop"), "stopped by another rank"
    return True


def _finish(run: Run, model, started: float, out: Path | None) -> None:
    run.summary.update(steps=run.step, seconds=round(time.perf_counter() - started, 3))
    run.hook.tuneforge_run_end(run=run, model=model, summary=run.summary)
    if out is not None and run.is_main:
        write_text(out / "summary.json", json.dumps(run.summary, indent=2, default=str))


def _record_frozen(run: Run, after: str, frozen, before: str) -> None:
    """Say in the summary whether the frozen weights are bit-for-bit what they were (``after``: their hash now)."""
    run.summary["frozen_weights"] = {
        "tensors": len(frozen), "values": sum(t.numel() for _, t in frozen), "sha256_before": before,
        "sha256_after": after, "unchanged": after == before,
    }
    if after != before:
        run.log("WARNING: weights that were frozen for this run changed (their SHA-256 differs before and after); "
                "a plugin wrote into them. See frozen_weights in summary.json.")


def _resume_from(cfg: TrainConfig, out: Path | None, owner: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint --resume continues from and its state.json; (None, None) for ``auto`` in a new folder."""
    if cfg.resume != "auto":
        return ckpt.open_intact(cfg.resume)
    if out is None:
        raise ConfigError("--resume auto needs --out (the run folder to continue)")
    # "auto" is the same command for the first launch and every restart of a preemptible job, so a damaged newest
    # checkpoint (a kill or a full disk while it was written by other means) falls back to the one before it.
    damaged: list[tuple[Path, str]] = []
    found = ckpt.open_latest(out, on_damaged=lambda folder, problem: damaged.append((folder, problem)))
    if damaged and found is None:
        raise CheckpointError(
            f"--resume auto: every checkpoint in {out} is damaged ({'; '.join(p for _, p in damaged)}). Nothing was "
            "changed; move them away to start afresh in this folder, or choose another --out")
    for folder, problem in damaged:
        if owner:  # rank 0 holds the folder; the other ranks pass over the same folders and find the same one
            moved = ckpt.set_aside(folder)
            say(f"{problem}: set {folder.name} aside as {moved.name}; resuming from {found[0].name}")
    return found if found is not None else (None, None)  # nothing yet: the first launch starts afresh


# Options a run may leave to the engine (None: sized to the model, see engine/defaults.py).
_ENGINE_CHOSEN = ("batch_size", "seq_len", "lr", "warmup")

# Options whose change on --resume says nothing about the weights or the data stream.
_FREE_ON_RESUME = {"resume", "out", "device", "log_every", "verify_frozen"}


def _resume_changes(path: Path, state: dict, cfg: TrainConfig, run: Run) -> None:
    """Options that differ from the checkpoint's (more --steps, another --batch-size, other mechanisms) are said in
    one line and kept in the summary. Mechanisms whose weights no longer fit are refused when the weights load."""
    saved = state.get("train") or {}
    check_resumable(saved, cfg, path)
    now = cfg.to_dict()
    changed = {k: [saved[k], v] for k, v in now.items() if k in saved and k not in _FREE_ON_RESUME and saved[k] != v}
    if changed:
        run.summary["resume_changes"] = changed
        run.log(f"resuming {path.name} with changed options: "
                + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items())
                + " (recorded as resume_changes in summary.json)")


def _show(value) -> str:
    if isinstance(value, list):  # mechanisms: their specs as given
        return "[" + " ".join(v if isinstance(v, str) else str(v[0]) if isinstance(v, (list, tuple)) else str(v)
                              for v in value) + "]"
    return str(value)
