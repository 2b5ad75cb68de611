"""``sft``: instruction tuning on prompt/completion and chat records (see :mod:`.plugin`)."""
from .plugin import Sft

__all__ = ["Sft"]
