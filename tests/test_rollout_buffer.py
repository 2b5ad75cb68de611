"""RolloutBuffer: the rows an online objective (ppo) trains on, their minibatch order and their checkpoint files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from tuneforge.sdk import CheckpointError, RolloutBuffer


def _rows(n=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    last = torch.randint(3, t, (n,), generator=g)  # (n,) each row's last real token
    return {"input": torch.randint(0, 50, (n, t), generator=g), "start": torch.full((n,), 2), "last": last,
            "logp": torch.randn(n, t - 1, generator=g), "mask": torch.ones(n, t - 1)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_minibatches_cover_every_row_in_a_seeded_order_and_trim_padding():
    buffer = RolloutBuffer(_rows(), epoch=3, stats={"reward": 0.5})
    assert len(buffer) == 6
    first = list(buffer.minibatches(2, passes=2, generator=7))
    again = list(buffer.minibatches(2, passes=2, generator=torch.Generator().manual_seed(7)))
    other = list(buffer.minibatches(2, passes=2, generator=8))
    assert len(first) == 6 and all(_same(a, b) for a, b in zip(first, again))
    assert not all(_same(a, b) for a, b in zip(first, other))
    # each pass holds every row once, in its own order
    for p in range(2):
        seen = torch.cat([mb["input"][:, 0] for mb in first[p * 3:(p + 1) * 3]])
        assert sorted(seen.tolist()) == sorted(buffer.rows["input"][:, 0].tolist())
    for mb in first:
        width = int(mb["last"].max()) + 1
        assert mb["input"].shape == (2, width) and mb["logp"].shape == (2, width - 1) and mb["reward"] == 0.5
    # a short last minibatch is dropped
    assert len(list(buffer.minibatches(4, generator=0))) == 1


def test_save_and_load_round_trip_in_ppos_file_format(tmp_path):
    rows = _rows()
    buffer = RolloutBuffer(rows, epoch=2, stats={"reward": 1.25, "kl": 0.5})
    state = {"kl_coef": 0.05, **buffer.save(tmp_path, "ppo_rollout.safetensors")}
    (tmp_path / "ppo.json").write_text(json.dumps(state))
    # the layout ppo has written since before the buffer: its json state beside one file of the columns
    assert state == {"kl_coef": 0.05, "rollout_epoch": 2, "stats": {"reward": 1.25, "kl": 0.5}}
    back = RolloutBuffer.load(tmp_path, "ppo_rollout.safetensors", json.loads((tmp_path / "ppo.json").read_text()))
    assert back.epoch == 2 and back.stats == buffer.stats and _same(back.rows, rows)
    assert _same(next(back.minibatches(3, generator=1)), next(buffer.minibatches(3, generator=1)))


def test_load_reads_a_file_written_without_the_buffer(tmp_path):
    rows = _rows()
    save_file({k: v.contiguous() for k, v in rows.items()}, str(tmp_path / "ppo_rollout.safetensors"))
    back = RolloutBuffer.load(tmp_path, "ppo_rollout.safetensors", {"rollout_epoch": 1, "stats": {"kl": 0.1}})
    assert back.epoch == 1 and back.stats == {"kl": 0.1} and _same(back.rows, rows)


def test_nothing_saved_loads_as_none(tmp_path):
    assert RolloutBuffer.load(tmp_path, "ppo_rollout.safetensors", {"kl_coef": 0.1}) is None
    assert RolloutBuffer.load(tmp_path, "ppo_rollout.safetensors", {"rollout_epoch": 0, "stats": {}}) is None


def test_a_damaged_or_foreign_file_is_a_clear_error(tmp_path):
    RolloutBuffer(_rows(), epoch=0).save(tmp_path, "r.safetensors")
    data = (tmp_path / "r.safetensors").read_bytes()
    (tmp_path / "r.safetensors").write_bytes(data[: len(data) // 2])  # cut short, as a kill while writing leaves it
    with pytest.raises(CheckpointError, match=r"r\.safetensors: unreadable rollout .*older checkpoint"):
        RolloutBuffer.load(tmp_path, "r.safetensors", {"rollout_epoch": 0, "stats": {}})
    save_file({"x": torch.zeros(3)}, str(tmp_path / "r.safetensors"))  # safetensors, but not a rollout
    with pytest.raises(CheckpointError, match=r"not a rollout .*'input', 'last'"):
        RolloutBuffer.load(tmp_path, "r.safetensors", {"rollout_epoch": 0, "stats": {}})


def test_rows_of_different_lengths_are_refused():
    rows = {**_rows(), "logp": torch.zeros(5, 8)}
    with pytest.raises(ValueError, match=r"every column needs 6 rows.*'logp': \(5, 8\)"):
        RolloutBuffer(rows, epoch=0)
