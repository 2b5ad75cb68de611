"""prompt-tuning: positions and masks of prepended prompts, mixed batches (forward, gradients, generation),
prompt files, and runs that prove the model stayed frozen."""
import json

import pytest
import torch

import tuneforge
from tuneforge import ConfigError
from tuneforge.models import routing
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.plugins.prompt_tuning import SoftPrompts, load_prompts

from conftest import TASK_MODEL


def _model(seed=0, **prompts):
    torch.manual_seed(seed)
    model = Transformer(model_config(TASK_MODEL)).eval()
    sp = SoftPrompts(model.config.d_model)
    for name, k in prompts.items():
        sp.add(name, torch.randn(k, model.config.d_model))
    model.prefix = sp
    return model


def test_a_prompt_made_of_token_embeddings_equals_those_tokens_in_the_input():
    # The prefix gets positions 0..K-1 and the input K..: exactly as if the tokens were typed.
    model = _model()
    words = torch.tensor([256, 104, 105, 33, 32])  # (K,)
    model.prefix.add("typed", model.tok_emb.weight[words].detach())
    x = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        with_prefix = model(x)
        model_plain = model.prefix
        model.prefix = None
        typed = model(torch.cat([words.expand(3, -1), x], dim=1))[:, len(words):]
        model.prefix = model_plain
    torch.testing.assert_close(with_prefix, typed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(4, 4), (3, 6)])
def test_mixed_batch_equals_each_task_alone_forward_and_gradients(lengths):
    model = _model(a=lengths[0], b=lengths[1]).train()
    x = torch.randint(0, 256, (6, 11))
    tasks = ["a", "b", "b", "a", "b", "a"]
    mixed_logits = None
    with routing.rows(tasks):
        mixed_logits = model(x)
    loss = mixed_logits.float().pow(2).mean(-1).sum()
    loss.backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.prefix.prompts.items()}
    model.zero_grad()
    alone = torch.empty_like(mixed_logits)
    total = 0
    for task in ("a", "b"):
        rows = [i for i, t in enumerate(tasks) if t == task]
        with routing.rows([task] * len(rows)):
            out = model(x[rows])
        alone[rows] = out.detach()
        total = total + out.float().pow(2).mean(-1).sum()
    total.backward()
    torch.testing.assert_close(mixed_logits.detach(), alone, rtol=1e-5, atol=1e-5)
    for name, p in model.prefix.prompts.items():
        torch.testing.assert_close(mixed_grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_rows_without_a_prompt_are_the_base_model():
    model = _model(a=5)
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad(), routing.rows(["a", ""]):
        mixed = model(x)
    base = _model()  # same seed, no prompts
    base.prefix = None
    with torch.no_grad():
        torch.testing.assert_close(mixed[1], base(x[1:])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(4, 4), (2, 5)])
def test_generation_with_the_kv_cache_matches_recomputation_in_a_mixed_left_padded_batch(lengths):
    model = _model(a=lengths[0], b=lengths[1])
    prompt = torch.randint(0, 256, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False  # a shorter, left-padded prompt
    with routing.rows(["b", "a", "b"]):
        cached = model.generate(prompt, 8, temperature=0, key_padding_mask=mask)
        fresh = model.generate(prompt, 8, temperature=0, key_padding_mask=mask, use_cache=False)
    assert torch.equal(cached, fresh)
    with routing.rows(["a"]):  # row 1 alone, without its padding, generates the same
        alone = model.generate(prompt[1:2, 2:], 8, temperature=0)
    assert torch.equal(alone[0, 4:], cached[1, 6:])


def test_routing_errors_are_clear():
    model = _model(a=3, b=3)
    x = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="holds soft prompts a, b.*routing.rows"):
        model(x)
    # a name no per-task module holds is a typo: raised when the routed block ends, after the forward ran
    with pytest.raises(ValueError, match="row 1 names task 'c', which no soft prompt, adapter or LoRA.*known: a, b"):
        with routing.rows(["a", "c"]):
            model(x)
    with routing.rows(["a"]), pytest.raises(ValueError, match="routing names 1 rows, the batch has 2"):
        model(x)


def test_context_counts_the_prompt():
    model = _model(a=30)
    with pytest.raises(ValueError, match="a prefix of 30"):
        model(torch.zeros(1, 230, dtype=torch.long))


def _pt(pretrained, out, spec, data="builtin:sentiment", **kw):
    base = dict(init=str(pretrained), mechanisms=[spec], data=data, steps=5, batch_size=16, lr=3e-2, warmup=1,
                eval_every=0, out=str(out))
    base.update(kw)
    return tuneforge.train(**base)


def test_training_moves_only_the_prompt_and_saves_a_tiny_file(pretrained, tmp_path):
    before = {k: v.clone() for k, v in tuneforge.load_model(pretrained).state_dict().items()}
    result = _pt(pretrained, tmp_path / "pt", "prompt-tuning:tasks=sentiment,tokens=8")
    after = result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.summary["frozen_weights"]["unchanged"] is True
    assert result.summary["frozen_weights"]["values"] == sum(v.numel() for k, v in before.items() if k != "lm_head.weight")
    assert result.summary["trainable_params"] == 8 * 32 and result.summary["objective"] == "prompt-tuning"
    assert "eval/accuracy" in result.metrics
    f = result.checkpoint / "prompts" / "sentiment.safetensors"
    assert f.stat().st_size < 8 * 32 * 4 + 1024
    (name, (tensor, meta)), = load_prompts(str(f)).items()
    assert name == "sentiment" and tensor.shape == (8, 32) and meta["tokens"] == "8"
    torch.testing.assert_close(tensor, result.model.prefix.prompts["sentiment"].detach())
    loaded = tuneforge.load_model(result.out)  # the prompt comes back with the model
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x))


def test_two_tasks_one_after_another_then_served_and_trained_in_one_mixed_batch(pretrained, tmp_path):
    sent = _pt(pretrained, tmp_path / "sent", "prompt-tuning:tasks=sentiment,tokens=4")
    topic = _pt(pretrained, tmp_path / "topic", "prompt-tuning:tasks=topic,tokens=6", data="builtin:topic")
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"text": r["text"], "label": r["label"], "task": "sentiment"} for r in tuneforge.data.world.builtin("sentiment")[:40]]
    rows += [{"text": r["text"], "label": r["label"], "task": "topic"} for r in tuneforge.data.world.builtin("topic")[:40]]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"prompt-tuning:load={sent.out},{topic.out},tasks="
    # serving: nothing trains, one evaluation over mixed rows, per-task accuracy reported
    served = _pt(pretrained, tmp_path / "serve", spec, data=str(mixed), eval_data=str(mixed))
    assert served.summary["trainable_params"] == 0
    assert {"eval/accuracy/sentiment", "eval/accuracy/topic"} <= served.metrics.keys()
    # training both at once on mixed batches: each prompt moves, from where its own run left it
    both = _pt(pretrained, tmp_path / "both", f"prompt-tuning:load={sent.out},{topic.out},tasks=sentiment,topic",
               data=str(mixed), batch_size=16, steps=3)
    prompts = both.model.prefix.prompts
    for name, run in (("sentiment", sent), ("topic", topic)):
        start = run.model.prefix.prompts[name]
        assert prompts[name].shape == start.shape and not torch.equal(prompts[name], start)
    assert both.summary["frozen_weights"]["unchanged"] is True


def test_loading_a_prompt_of_another_width_is_refused(pretrained, tmp_path):
    other = tuneforge.train(model="tiny:n_layers=1,d_model=16,n_heads=2,max_seq_len=64",
                            mechanisms=["prompt-tuning:tokens=2", "pretrain"], data="builtin:text", steps=1,
                            batch_size=4, seq_len=16, eval_every=0, out=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="16 wide; this model's embeddings are 32"):
        _pt(pretrained, tmp_path / "pt", f"prompt-tuning:load={other.out},tasks=")


def test_prompt_tuning_beside_another_objective_uses_that_one(pretrained, tmp_path):
    result = _pt(pretrained, tmp_path / "pt", "prompt-tuning:tokens=4",
                 mechanisms=["prompt-tuning:tokens=4", "finetune:layers=0,head=classify"])
    assert result.summary["objective"] == "finetune"
    assert set(result.summary["trainable_by_plugin"]) == {"prompt-tuning", "finetune"}
    loaded = tuneforge.load_model(result.out)  # prompts and head, both rebuilt
    assert "default" in loaded.prefix.prompts and loaded.lm_head.labels == ["negative", "positive"]


def test_bad_prompt_tuning_options(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="tokens must be at least 1"):
        _pt(pretrained, tmp_path / "a", "prompt-tuning:tokens=0")
    with pytest.raises(ConfigError, match="leaves no room"):
        _pt(pretrained, tmp_path / "b", "prompt-tuning:tokens=256")
    with pytest.raises(ConfigError, match="neither a prompt file"):
        _pt(pretrained, tmp_path / "c", f"prompt-tuning:load={tmp_path / 'nope'}")


def test_prompt_files_load_frozen_from_a_folder_of_them_or_one_file_under_a_new_name(tmp_path):
    from tuneforge.plugins.prompt_tuning import PromptTuning, base_fingerprint, write_prompt

    d = _model().config.d_model
    saved = {"a": torch.randn(3, d), "b": torch.randn(5, d)}
    (tmp_path / "copied").mkdir()
    for name, value in saved.items():
        write_prompt(tmp_path / "copied" / "prompts", name, value, base=base_fingerprint(_model()))
    for spec in (tmp_path / "copied", tmp_path / "copied" / "prompts"):  # a folder holding prompts/, or prompts/
        model = _model()
        assert PromptTuning.load_frozen(model, str(spec)) == ["a", "b"]
        for name, value in saved.items():
            assert torch.equal(model.prefix.prompts[name], value) and not model.prefix.prompts[name].requires_grad
    model = _model()
    assert PromptTuning.load_frozen(model, f"{tmp_path / 'copied' / 'prompts' / 'a.safetensors'}@c") == ["c"]
    assert torch.equal(model.prefix.prompts["c"], saved["a"])
    with pytest.raises(ConfigError, match="two parts named 'c'"):
        PromptTuning.load_frozen(model, f"{tmp_path / 'copied' / 'prompts' / 'b.safetensors'}@c")


def test_a_prompt_from_a_base_of_other_shapes_is_noted(tmp_path):
    from tuneforge.plugins.prompt_tuning import PromptTuning, write_prompt

    model = _model()
    f = write_prompt(tmp_path, "a", torch.randn(2, model.config.d_model), base="0123456789abcdef")
    with pytest.warns(UserWarning, match=r"prompt 'a' from .*a\.safetensors was trained on a base of other shapes"):
        PromptTuning.load_frozen(model, str(f))
