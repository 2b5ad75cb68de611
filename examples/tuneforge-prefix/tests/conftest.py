"""Fixtures: tuneforge.sdk.testing's (tiny_model, tiny_data, tiny_pretrained, train_tiny) and this package's own."""
import pytest
import torch

pytest_plugins = ["tuneforge.sdk.testing"]


# The models here are tiny: one thread does their work faster than two contending for 2 cores (several times
# faster on a busy machine). Subprocesses get OMP_NUM_THREADS=1 (test_package.py).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _only_ours(monkeypatch):
    """Of the third-party plugins installed here, runs see this package's alone (tuneforge's built-ins always load)."""
    monkeypatch.setenv("TUNEFORGE_LOAD_PLUGINS", "prefix,simpo")
    monkeypatch.delenv("TUNEFORGE_STRICT_PLUGINS", raising=False)


@pytest.fixture(scope="session")
def well_pretrained(tmp_path_factory):
    """TINY pretrained for 150 steps (about 2 s): after tiny_pretrained's 30 steps the keys and values a prefix is
    read against are still near their init, and a few steps of prefix tuning show little."""
    from tuneforge.sdk.testing import pretrained_tiny

    return pretrained_tiny(tmp_path_factory.mktemp("well-pretrained") / "run", steps=150)


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """A tiny random Llama folder (grouped-query attention: 4 query heads, 2 key/value heads), written as a user would."""
    pytest.importorskip("transformers")
    from tuneforge.sdk.testing import tiny_hf_folder

    return tiny_hf_folder(tmp_path_factory.mktemp("hf") / "llama", "llama", context=64)
