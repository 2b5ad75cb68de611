"""``sft``: instruction tuning on prompt/completion and chat records, the loss on the answers only.

The mechanism as a folder:

- ``examples.py``: records as token rows with the answers marked, and an epoch's padded or packed batches;
- ``evaluate.py``: the held-out answers' loss and greedy exact match (per ``kind``);
- ``plugin.py``: :class:`Sft`, the plugin (options, hooks).

It imports tuneforge only through :mod:`tuneforge.sdk` (chat records and templates are core's
:mod:`tuneforge.data.chat`, shared with ``tuneforge chat`` and the rankings of reward-model, dpo and ppo).
"""
from .plugin import Sft

__all__ = ["Sft"]
