"""A Hugging Face tokenizer (``tokenizer.json``, read by the ``tokenizers`` package) behind tuneforge's
tokenizer interface: ``encode(text, bos=, eos=)``, ``decode(ids)``, ``bos_id`` / ``eos_id`` / ``pad_id``.

The special tokens come from the folder's ``tokenizer_config.json`` (``bos_token``...), else from the model's
``config.json`` / ``generation_config.json`` ids. GPT-2-style tokenizers have no padding token: the eos token
pads (padded positions are masked everywhere, so its value never matters), and one without a bos token (Qwen)
starts documents with its eos token, as GPT-2's single ``<|endoftext|>`` does. ``encode`` adds specials only as
asked (the tokenizer's own post-processor is bypassed), so data code decides where bos and eos go, as with bytes.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tuneforge.errors import ConfigError

__all__ = ["HFTokenizer", "read_json"]


def read_json(path: Path) -> dict:
    """A model folder's JSON file as a dict ({} when absent); anything unreadable is a ConfigError naming it."""
    if not path.is_file():
        return {}
    damaged = (f"the model folder is damaged: copy {path.name} again from where the model came from, or save the "
               "model again with save_pretrained")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {damaged}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); {damaged}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds a JSON {type(value).__name__}, not an object; {damaged}")
    return value


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, cfg: dict) -> str | None:
    """The folder's default chat template: ``chat_template.jinja`` (transformers >= 4.43 saves it there), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: the one named default)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} cannot be read ({exc}); copy it again from where the model came from") from None
    value = cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """The tokenizer of a Hugging Face model folder; see the module docstring."""

    def __init__(self, folder: str | Path, model_config: dict | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("reading a Hugging Face tokenizer needs the 'tokenizers' package: "
                              "pip install 'tuneforge[hf]'") from None
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{folder} has no tokenizer.json (the fast-tokenizer file); save the tokenizer with "
                              "tokenizer.save_pretrained(folder) from transformers, or convert a slow one first")
        self.folder = folder
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises a bare Exception for any file it cannot parse
            reason = str(exc).splitlines()[0].strip("'\"") if str(exc) else type(exc).__name__
            raise ConfigError(f"{path} cannot be read by the tokenizers package ({reason}); the file is damaged or "
                              "incomplete: copy it again from where the model came from, or save the tokenizer again "
                              "with tokenizer.save_pretrained(folder)") from None
        self.name = f"hf:{folder.name}"
        cfg = read_json(folder / "tokenizer_config.json")
        ids = {**(model_config or {}), **read_json(folder / "generation_config.json")}
        self.bos_id = self._special(cfg.get("bos_token"), ids.get("bos_token_id"))
        self.eos_id = self._special(cfg.get("eos_token"), ids.get("eos_token_id"))
        if self.bos_id is None:  # documents still need a first token (generation from nothing, data rows)
            self.bos_id = self.eos_id
        pad = self._special(cfg.get("pad_token"), ids.get("pad_token_id"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.bos_token = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self._tok.id_to_token(self.eos_id) if self.eos_id is not None else None
        self.chat_template = _chat_template(folder, cfg)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # ids need not be contiguous: the largest one bounds what the model's embedding must hold
        self.id_limit = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _special(self, text, fallback) -> int | None:
        text = _token_text(text)
        if text is not None:
            found = self._tok.token_to_id(text)
            if found is not None:
                return found
        if isinstance(fallback, list):  # generation_config may list several eos ids: the first is the eos
            fallback = fallback[0] if fallback else None
        return int(fallback) if fallback is not None else None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of text a chat template rendered: special tokens written as text (``<|im_start|>``) are read as those
        tokens, and nothing is added (the template decides where bos and eos go)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.folder)!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"
