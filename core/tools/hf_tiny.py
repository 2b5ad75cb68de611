"""Tiny Hugging Face model folders, made on the spot: for tests, benchmarks and trying ``--model hf:`` offline.

:func:`make_tiny` writes what ``save_pretrained`` writes for a real model (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``), with a random GPT-2-, Llama- or
Qwen2-style model of the given size and a byte-level BPE tokenizer trained on the embedded world's text, so
every mechanism and the demo run on it exactly as on a downloaded model. ``tuneforge hf-tiny OUT`` is the
command line face.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.errors import ConfigError
from tuneforge.common.names import replace_folder

__all__ = ["make_tiny", "FAMILY_CONFIGS"]

#: Marks a folder hf-tiny wrote, the only kind it replaces.
MARKER = ".tuneforge-hf-tiny"
SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def _tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tuneforge.data.world import builtin
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r["text"] for r in builtin("text", split="train", seed=seed)), trainer=trainer)
    return tok


def _config(family: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int, context: int, ids: dict):
    import transformers
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=d_model, n_layer=n_layers,
                                       n_head=n_heads, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=(8 * d_model) // 3 // 8 * 8,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=context, **ids)
    if family == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    return transformers.Qwen2Config(tie_word_embeddings=True, **common)


#: the model families :func:`make_tiny` can write
FAMILY_CONFIGS = ("gpt2", "llama", "qwen2")


def _pretrain(model, tok, steps: int, context: int, seed: int) -> None:
    """A few hundred plain next-token steps on the world's text, so the folder holds a model that has learned
    something (adapters, LoRA and soft prompts then have features to work with, as on a real model)."""
    from tuneforge.data.world import builtin
    stream = [i for r in builtin("text", split="train", seed=seed)[:2000] for i in tok.encode(r["text"]).ids]
    data = torch.tensor(stream)
    T = min(64, context)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T, (16,), generator=g)
        ids = torch.stack([data[s:s + T] for s in starts])  # (16, T)
        logits = model(input_ids=ids).logits[:, :-1]  # (16, T-1, V): each position predicts the next token
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def make_tiny(folder: str | Path, family: str = "gpt2", *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
              context: int = 128, vocab_size: int = 512, train_steps: int = 0, seed: int = 0) -> Path:
    """Write a ``family`` model (gpt2, llama: grouped-query attention, qwen2: tied embeddings) and its tokenizer to
    ``folder``; returns the folder. The weights are random, then trained ``train_steps`` next-token steps on the
    embedded world's text. Nothing is downloaded."""
    if family not in FAMILY_CONFIGS:
        raise ConfigError(f"family {family!r}: make_tiny writes {', '.join(FAMILY_CONFIGS)}")
    try:
        import transformers
    except ImportError:
        raise ConfigError("making a Hugging Face model needs transformers: pip install 'tuneforge[hf]'") from None
    folder = Path(folder)

    def fill(tmp: Path) -> None:
        tok = _tokenizer(vocab_size, seed)
        tok.save(str(tmp / "tokenizer.json"))
        ids = {f"{k[:-6]}_token_id": tok.token_to_id(v) for k, v in SPECIALS.items()}  # bos_token_id...
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {**SPECIALS, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context}, indent=2) + "\n")
        config = _config(family, tok.get_vocab_size(), d_model, n_layers, n_heads, context, ids)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config)
            if train_steps:
                _pretrain(model, tok, train_steps, context, seed)
        from tuneforge.models.hf_reading import quiet as _quiet
        with _quiet(transformers):
            model.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"format": "tuneforge.models.hf-tiny", "family": family}) + "\n")

    # A real model folder holds the same file names: only a folder this command wrote is ever replaced.
    replace_folder(folder, fill, ours=lambda f: (f / MARKER).is_file(), owner="hf-tiny",
                   refusal=f"hf-tiny: {folder} is not empty and was not written by hf-tiny (no {MARKER}): nothing "
                           "was written; give a new or empty folder")
    return folder
