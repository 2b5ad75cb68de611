"""The README's examples are code users copy: run them."""
import re
from pathlib import Path

import tuneforge

README = Path(__file__).resolve().parents[1] / "README.md"


def test_write_your_own_mechanism_example_trains():
    text = README.read_text()
    section = text[text.index("## Write your own mechanism"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cls = namespace["SmoothLM"]
    result = tuneforge.train(model="tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32",
                             mechanisms=[cls(cls.Options(smoothing=0.05))], steps=30, batch_size=8, eval_every=0)
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.5
    assert result.summary["mechanisms"] == ["smoothlm"]


def test_quickstart_has_exactly_the_two_commands():
    text = README.read_text()
    quick = text[text.index("## Quickstart"):text.index("## Mechanisms")]
    commands = [line.split("#")[0].strip() for line in re.search(r"```bash\n(.*?)```", quick, re.S).group(1).splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_mixed_batch_example_runs(pretrained, tmp_path, monkeypatch):
    import shutil

    import torch

    text = README.read_text()
    section = text[text.index("Fine-tuning, soft prompts and prompting"):text.index("## Write your own mechanism")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pretrained, "runs/pre")
    for task, out in (("sentiment", "runs/pt-s"), ("topic", "runs/pt-t")):
        tuneforge.train(init="runs/pre", mechanisms=[f"prompt-tuning:tasks={task},tokens=4"], data=f"builtin:{task}",
                        steps=2, batch_size=8, eval_every=0, out=out)
    namespace = {"ids": torch.randint(0, 256, (3, 10))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (3, 10, 259)
