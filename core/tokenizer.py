"""Byte-level tokenizer: every UTF-8 byte is a token, plus three specials. Nothing to download or train."""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ByteTokenizer", "tokenizer_of"]


class ByteTokenizer:
    """Maps text to UTF-8 bytes (ids 0..255) and back; ids 256.. are special tokens."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    name = "bytes"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
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
