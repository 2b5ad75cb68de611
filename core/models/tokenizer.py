"""Byte-level tokenizer: every UTF-8 byte is a token, plus three specials. Nothing to download or train."""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ByteTokenizer", "tokenizer_of", "id_limit", "check_vocabulary"]


_SPECIALS = re.compile("(<bos>|<eos>)")


class ByteTokenizer:
    """Maps text to UTF-8 bytes (ids 0..255) and back; ids 256.. are special tokens."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    name = "bytes"
    #: how the special tokens are written in text a chat template renders (see :meth:`encode_rendered`)
    bos_token, eos_token = "<bos>", "<eos>"
    chat_template = None  # no template of its own: tuneforge.data.chat renders with its built-in one

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of text a chat template rendered, where ``<bos>`` and ``<eos>`` stand for those tokens (a template
        writes special tokens as text; bytes alone could never produce them)."""
        ids: list[int] = []
        for piece in _SPECIALS.split(text):
            special = {self.bos_token: self.bos_id, self.eos_token: self.eos_id}.get(piece)
            ids.extend([special] if special is not None else self.encode(piece))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special:
                out += {self.bos_id: b"<bos>", self.eos_id: b"<eos>", self.pad_id: b"<pad>"}.get(i, b"<?>")
        # A sampled sequence can cut a multi-byte character in half: show a replacement char, never raise.
        return out.decode("utf-8", errors="replace")


def tokenizer_of(model) -> "ByteTokenizer":
    """The tokenizer a model reads: the one it carries (a Hugging Face model's), else the embedded bytes."""
    return getattr(model, "tokenizer", None) or ByteTokenizer()


def id_limit(tokenizer) -> int:
    """One more than the largest token id ``tokenizer`` can produce, its special tokens included."""
    specials = [getattr(tokenizer, n, None) for n in ("bos_id", "eos_id", "pad_id")]
    limit = getattr(tokenizer, "id_limit", None) or tokenizer.vocab_size
    return max([limit] + [i + 1 for i in specials if i is not None])


def check_vocabulary(embedding, tokenizer, *, where: str, fix: str) -> None:
    """Refuse a token ``embedding`` (an ``nn.Embedding``) with fewer rows than ``tokenizer`` has ids: the first
    batch holding a larger id would crash the run mid-way (an index error, after the run folder was made).

    :param where: the model as the user named it (``--model tiny:vocab_size=10``); ``fix``: what to do instead.
    :raises ConfigError: naming both sizes, ``where`` and ``fix``.
    """
    from tuneforge.errors import ConfigError

    rows, need = embedding.num_embeddings, id_limit(tokenizer)
    if rows < need:
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        raise ConfigError(f"{where}: the model's token embedding has {rows} rows, but its tokenizer ({name}) produces "
                          f"ids up to {need - 1}; {fix}")
