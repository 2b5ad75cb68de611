"""``progress``: a tqdm bar on a terminal, a log line every ``log_every`` steps elsewhere (autoloaded)."""
from __future__ import annotations

import sys

from tuneforge.sdk import hookimpl

__all__ = ["Progress"]


def _fmt(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.4f}" if "loss" in metrics else None]
    parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1][:3]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if metrics.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return "  ".join(p for p in parts if p)


class Progress:
    """Shows training progress: a tqdm bar when stderr is a terminal, plain lines in logs and CI."""

    autoload = True

    def __init__(self):
        self.bar = None

    @hookimpl
    def tuneforge_run_start(self, run, model):
        if not run.is_main:
            return
        s = run.summary
        if not s["trainable_params"]:
            run.log(f"{', '.join(s['mechanisms'])} on {run.model_config.n_layers}-layer model: nothing trains "
                    f"(all {s['total_params']:,} parameters frozen); evaluating on {s['device']}")
            return
        run.log(
            f"{', '.join(s['mechanisms'])} on {run.model_config.n_layers}-layer model: "
            f"{s['trainable_params']:,} of {s['total_params']:,} parameters train ({s['trainable_pct']:.2f}%), "
            f"{run.config.steps} steps on {s['device']}" + (f", resuming at step {run.step}" if run.step else "")
        )
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=run.config.steps, initial=run.step, unit="step", dynamic_ncols=True, leave=True)

    @hookimpl
    def tuneforge_step_end(self, run, step, metrics):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(_fmt(metrics), refresh=False)
        elif run.is_main and (step % run.config.log_every == 0 or step == run.config.steps or metrics.get("skipped")):
            run.log(f"step {step}/{run.config.steps}  {_fmt(metrics)}")

    @hookimpl
    def tuneforge_run_end(self, run, summary):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if run.is_main:
            evals = "  ".join(f"{k} {v:.4f}" for k, v in (summary.get("eval") or {}).items())
            if summary.get("trainable_params") == 0:
                run.log(f"evaluated in {summary.get('seconds')} s (nothing trained)  {evals}")
            else:
                run.log(f"{summary.get('status')} after {summary.get('steps')} steps in {summary.get('seconds')} s  {evals}")
