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


def _python_block_after(heading: str, pretrained, tmp_path, monkeypatch) -> str:
    """The first python block after ``heading``, with the working folder set up as the README assumes."""
    import shutil

    text = README.read_text()
    section = text[text.index(heading):text.index("## Write your own mechanism")]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pretrained, "runs/pre")
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_mixed_batch_example_runs(pretrained, tmp_path, monkeypatch):
    import torch

    code = _python_block_after("Fine-tuning, soft prompts and prompting", pretrained, tmp_path, monkeypatch)
    for task, out in (("sentiment", "runs/pt-s"), ("topic", "runs/pt-t")):
        tuneforge.train(init="runs/pre", mechanisms=[f"prompt-tuning:tasks={task},tokens=4"], data=f"builtin:{task}",
                        steps=2, batch_size=8, eval_every=0, out=out)
    namespace = {"ids": torch.randint(0, 256, (3, 10))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (3, 10, 259)


def test_adapters_and_lora_example_runs(pretrained, tmp_path, monkeypatch):
    import torch

    code = _python_block_after("### Adapters and LoRA", pretrained, tmp_path, monkeypatch)
    for task, out in (("sentiment", "runs/lora-s"), ("topic", "runs/lora-t")):
        tuneforge.train(init="runs/pre", mechanisms=["lora:rank=2"], data=f"builtin:{task}", steps=2, batch_size=8,
                        lr=0.05, eval_every=0, out=out)
    ids = torch.randint(0, 256, (3, 10))
    namespace = {"ids": ids}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert namespace["logits"].shape == (3, 10, 259)
    from tuneforge.plugins.lora import lora_layers
    from tuneforge.sdk import using

    assert [p for p, _ in lora_layers(model)][:2] == ["blocks.0.attn.q", "blocks.0.attn.v"]
    assert model.get_submodule("blocks.0.attn.q").merged == ["s"]  # the example ends merged
    base = tuneforge.load_model("runs/pre")
    with torch.no_grad(), using(model, ["s"]):  # merged s, and not t
        merged = model(ids[:1])
        torch.testing.assert_close(merged, tuneforge.load_model("runs/lora-s")(ids[:1]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged, base(ids[:1]))
