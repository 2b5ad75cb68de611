import os

import pluggy
import pytest

# tuneforge.hookimpl (pluggy's marker of the project "tuneforge"), without importing tuneforge at collection
_hookimpl = pluggy.HookimplMarker("tuneforge")

# A model small enough that a few dozen steps take a second on 2 cores.
MICRO = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n logical``), the workers share the machine's cores: each worker's
    torch, and every process its tests start (the CLI, torchrun's ranks), gets its share of threads rather than
    all of them, so that workers do not oversubscribe the cores they split."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = share
        import torch

        torch.set_num_threads(int(share))


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """Tests see only tuneforge's own plugins unless they opt in, whatever else is installed here."""
    monkeypatch.setenv("TUNEFORGE_LOAD_PLUGINS", "")
    monkeypatch.delenv("TUNEFORGE_STRICT_PLUGINS", raising=False)
    yield


@pytest.fixture
def micro():
    return MICRO


def micro_config(tmp_path=None, **kw):
    from tuneforge import TrainConfig

    base = dict(model=MICRO, mechanisms=["pretrain"], data="builtin:text", steps=12, batch_size=8,
                eval_every=0, warmup=2, lr=3e-3)
    if tmp_path is not None:
        base["out"] = str(tmp_path / "run")
    base.update(kw)
    return TrainConfig(**base)


os.environ.setdefault("PYTHONHASHSEED", "0")


class StopAt:
    """A plugin that stops the run after a given step (checkpoint, then end), as a preempted job would be; the
    schedule stays that of the whole run. Tests of exact resume pass it as a plugin object."""

    name = "stop-at"

    def __init__(self, step, reason="stopped by the test"):
        self.step, self.reason = step, reason

    @_hookimpl
    def tuneforge_step_end(self, run, step):
        if step == self.step:
            run.request_stop(self.reason)


# Long enough for labelled records (up to ~110 bytes) with a few-shot example; two blocks for layers=N tests.
TASK_MODEL = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=256"


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A briefly pretrained TASK_MODEL checkpoint, the --init of the mechanism tests."""
    from tuneforge import train

    out = tmp_path_factory.mktemp("pretrained") / "run"
    os.environ["TUNEFORGE_LOAD_PLUGINS"] = ""
    try:
        train(model=TASK_MODEL, mechanisms=["pretrain"], data="builtin:text", steps=30, batch_size=8, seq_len=64,
              lr=3e-3, warmup=3, eval_every=0, out=str(out))
    finally:
        del os.environ["TUNEFORGE_LOAD_PLUGINS"]
    return out


def task_model(seed=0):
    """A fresh TASK_MODEL in eval mode, seeded: the base the adapter, LoRA and prompt tests put parts on."""
    import torch

    from tuneforge.models.transformer import Transformer, model_config

    torch.manual_seed(seed)
    return Transformer(model_config(TASK_MODEL)).eval()


def check_mixed_equals_alone(model, tasks, x, params):
    """One routed forward over rows of mixed tasks equals each task's rows run alone: outputs, and the gradients
    of ``params()`` ((name, parameter) pairs) under the same loss. Returns the mixed batch's gradients."""
    import torch

    from tuneforge.models import routing

    with routing.rows(tasks):
        mixed = model(x)
    mixed.pow(2).mean(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in params()}
    model.zero_grad()
    alone = torch.empty_like(mixed)
    total = 0
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        with routing.rows([task] * len(rows)):
            out = model(x[rows])
        alone[rows] = out.detach()
        total = total + out.pow(2).mean(-1).sum()
    total.backward()
    torch.testing.assert_close(mixed.detach(), alone, rtol=1e-5, atol=1e-5)
    for n, p in params():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    return grads


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (``--model smollm2-135m``), converted from its GGUF file once: the cache
    (``$TUNEFORGE_CACHE``, by default ``~/.cache/tuneforge``) outlives the run, so only a machine's first run pays
    the conversion. Skips, naming the install line, where the package that ships the file is not installed."""
    from types import SimpleNamespace

    from tuneforge.errors import ConfigError
    from tuneforge.models import gguf

    try:
        file = gguf.named_file("smollm2-135m")
    except ConfigError:
        pytest.skip(f"SmolLM2-135M is not installed: {gguf.NAMED['smollm2-135m'].install}")
    return SimpleNamespace(spec="smollm2-135m", file=file, folder=gguf.convert(file))
