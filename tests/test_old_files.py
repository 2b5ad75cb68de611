"""Files written before the package layout changed still load: a checkpoint, a LoRA part folder, a soft prompt.

``tests/fixtures/pre-layout-checkpoint`` was written by commit 2a74277 (the last one with the flat ``core/``):
two steps of ``prompt-tuning:tokens=2,tasks=sentiment`` + ``lora:rank=2,targets=q,v,tasks=sentiment`` on the
testing helpers' tiny model. Nothing here regenerates it; a format change that breaks old files fails here.
"""
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

import tuneforge
from tuneforge.sdk.testing import train_tiny

FIXTURE = Path(__file__).parent / "fixtures" / "pre-layout-checkpoint"
PROMPT = FIXTURE / "prompts" / "sentiment.safetensors"
LORA = FIXTURE / "lora" / "sentiment"


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    # (r, in) and (out, r) per adapted layer, keyed as the part file keys them: <layer path>.lora_a / .lora_b
    return {f"{path}.lora_{ab}": p for path, m in model.named_modules() if hasattr(m, "lora_a")
            for ab in "ab" for name, p in getattr(m, f"lora_{ab}").items() if name == "sentiment"}


def _prompt(model) -> torch.Tensor:
    return model.prefix.prompts["sentiment"]


def test_old_checkpoint_loads_with_its_weights_parts_and_prompt():
    model = tuneforge.load_model(FIXTURE)
    saved = load_file(FIXTURE / "model.safetensors")
    state = model.state_dict()
    base = [k for k in saved if k in state]
    assert base, "no weight of the old checkpoint is found on the loaded model"
    for key in base:
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)
    torch.testing.assert_close(_prompt(model).detach(), next(iter(load_file(PROMPT).values())), rtol=0, atol=0)
    part = load_file(LORA / "adapter.safetensors")
    ours = _lora_tensors(model)
    assert set(ours) == set(part)
    for key, value in part.items():
        torch.testing.assert_close(ours[key].detach(), value, rtol=0, atol=0)


def test_old_lora_folder_and_prompt_file_load_into_a_new_run(tmp_path):
    # loaded parts that are not in tasks= stay frozen, so after training they are still the files' tensors
    result = train_tiny(f"prompt-tuning:load={PROMPT}", f"lora:load={LORA}", out=tmp_path / "run",
                        objective="finetune:layers=1")
    torch.testing.assert_close(_prompt(result.model).detach().cpu(), next(iter(load_file(PROMPT).values())),
                               rtol=0, atol=0)
    ours = _lora_tensors(result.model)
    for key, value in load_file(LORA / "adapter.safetensors").items():
        torch.testing.assert_close(ours[key].detach().cpu(), value, rtol=0, atol=0)


def test_old_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(FIXTURE, run / FIXTURE.name.replace("pre-layout-checkpoint", "step-00000002"))
    result = train_tiny("prompt-tuning:tokens=2,tasks=sentiment", "lora:rank=2,targets=q,v,tasks=sentiment",
                        out=run, objective=None, data="builtin:sentiment", steps=3, resume="auto")
    assert result.summary["steps"] == 3
    assert len(result.history) == 1  # one step run: steps 1-2 came from the old checkpoint
    assert (run / "step-00000003").is_dir()
