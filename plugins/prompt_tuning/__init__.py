"""``prompt-tuning``: learned virtual-token embeddings prepended to the input, one named prompt per task.

The mechanism as a folder, like ``lora`` and ``adapter``:

- ``prompts.py``: :class:`SoftPrompts` (the module in a model's prefix slot) and the prompt files
  (``prompts/<task>.safetensors``: reading, writing, the shapes a checkpoint's model file holds);
- ``plugin.py``: :class:`PromptTuning`, the plugin (options, hooks) on :class:`tuneforge.sdk.PartMechanism`, and
  :func:`load_prompts` / :func:`add_prompts` for prompt files, checkpoints and run folders.

It imports tuneforge only through :mod:`tuneforge.sdk`.
"""
from tuneforge.sdk import base_fingerprint

from .plugin import PromptTuning, add_prompts, load_prompts
from .prompts import FORMAT, PROMPTS_DIR, SoftPrompts, read_prompt, write_prompt

__all__ = ["PromptTuning", "SoftPrompts", "load_prompts", "add_prompts", "base_fingerprint", "FORMAT", "PROMPTS_DIR",
           "read_prompt", "write_prompt"]
