"""Fixtures: tuneforge.sdk.testing's (tiny_model, tiny_data, tiny_pretrained, train_tiny) and this package's own."""
import pytest
import torch

pytest_plugins = ["tuneforge.sdk.testing"]


# The models here are tiny: one thread does their work faster than two contending for 2 cores (several times
# faster on a busy machine). Subprocesses get OMP_NUM_THREADS=1 (test_package.py).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _only_ia3(monkeypatch):
    """Of the third-party plugins installed here, runs see this one alone (tuneforge's built-ins always load)."""
    monkeypatch.setenv("TUNEFORGE_LOAD_PLUGINS", "ia3")
    monkeypatch.delenv("TUNEFORGE_STRICT_PLUGINS", raising=False)


@pytest.fixture(scope="session")
def well_pretrained(tmp_path_factory):
    """TINY pretrained for 150 steps (about 2 s). After tiny_pretrained's 30 steps the block's weights are still
    near their init and add little to the residual stream; IA³ can only rescale what the block computes, so it
    needs a block that computes something before its effect on the loss is more than a rounding of one."""
    from tuneforge.sdk.testing import pretrained_tiny

    return pretrained_tiny(tmp_path_factory.mktemp("well-pretrained") / "run", steps=150)
