"""``lora``: low-rank updates beside a model's linear layers, many named ones per layer, one per task.

The mechanism as a folder, like the IA³ example:

- ``layer.py``: :class:`LoRALinear` (the layer that replaces an ``nn.Linear``), :func:`merge` / :func:`unmerge`;
- ``peft.py``: reading and writing Hugging Face PEFT's LoRA folders (``export-peft``, ``load=`` of a PEFT folder);
- ``plugin.py``: :class:`Lora`, the plugin (options, hooks) on :class:`tuneforge.sdk.PartMechanism`.

It imports tuneforge only through :mod:`tuneforge.sdk`.
"""
from .layer import LoRALinear, lora_layers, lora_state, merge, unmerge
from .peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, is_peft, read_peft, write_peft
from .plugin import Lora, add_lora, install_lora, load_lora

__all__ = ["Lora", "add_lora", "load_lora", "install_lora", "LoRALinear", "lora_layers", "lora_state", "merge",
           "unmerge", "PEFT_CONFIG", "PEFT_WEIGHTS", "is_peft", "read_peft", "write_peft", "export_peft"]
