"""Fixtures: tuneforge.sdk.testing's (tiny_model, tiny_data, tiny_pretrained, train_tiny) and this package's own.

tiny_pretrained (TINY pretrained for PRETRAINED_STEPS, once per session) is trained far enough for IA³ to
matter: IA³ only rescales what the block computes, so it needs a block that computes something."""
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
