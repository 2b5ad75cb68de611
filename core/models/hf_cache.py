"""The KV cache of a Hugging Face model (:class:`HFCache`): a transformers cache plus what tuneforge's
``plan_input`` tracks, so ``generate`` and incremental forwards run on ``HFCausalLM`` as on the embedded model.

Imports transformers only when a cache is made (it is optional).
"""
from __future__ import annotations

import torch

from tuneforge.models.generation import repeat_prefix

__all__ = ["HFCache"]


class HFCache:
    """A transformers cache plus what ``plan_input`` tracks: tokens held and the cached prefix.

    With ``max_len`` known (``generate`` knows it) it is a ``StaticCache``: each layer's keys and values are
    allocated once and written in place, and attention reads the filled part as a view. Without, a
    ``DynamicCache``, which grows by concatenating (a copy of the layer's cache per call) but needs no length.
    """

    def __init__(self, hf_config, max_len: int | None = None, batch_size: int | None = None):
        from transformers import DynamicCache, StaticCache
        self.kv = DynamicCache(config=hf_config) if max_len is None else \
            StaticCache(config=hf_config, max_cache_len=max_len)
        self.max_len = max_len  # None: no limit but the model's context
        self.batch_size = batch_size  # rows (None: whatever the first call has)
        self.length = 0
        self.prefix = None
        self.prefix_layout = None  # see generation.plan_input

    def repeat_rows(self, times: int) -> "HFCache":
        """Make each row ``times`` rows, in place: row i becomes rows i * times .. i * times + times - 1 (prompt-major),
        each holding row i's cached keys/values and prefix (see ``KVCache.repeat_rows``); returns the cache.

        Through transformers' own batch reordering (``Cache.reorder_cache``, which beam search uses), so every kind
        of layer it has (dynamic, static, sliding-window, linear-attention states) is repeated as it stores itself."""
        held = [t for layer in self.kv.layers if torch.is_tensor(t := getattr(layer, "keys", None))]
        rows = held[0].size(0) if held else self.batch_size
        if self.length:
            if rows is None:
                raise RuntimeError("repeat_rows: the cache holds tokens, but no layer holds keys to count its rows by")
            index = torch.arange(rows, device=held[0].device if held else None).repeat_interleave(times)  # (rows * G,)
            self.kv.reorder_cache(index)
            for layer in self.kv.layers:
                if isinstance(getattr(layer, "batch_size", None), int):  # a static layer's record of its rows
                    layer.batch_size *= times
        if rows is not None:
            self.batch_size = rows * times
        self.prefix, self.prefix_layout = repeat_prefix(self.prefix, self.prefix_layout, times)
        return self
