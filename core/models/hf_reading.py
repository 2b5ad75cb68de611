"""Reading a Hugging Face folder with transformers, quietly and with clear errors: its own progress bar and log
held back until a load succeeds, damaged weight files caught before the loader, and what transformers, safetensors
or torch raise about an unreadable folder turned into one ConfigError naming the folder, the file and the fix."""
from __future__ import annotations

import contextlib
import pickle
from logging.handlers import BufferingHandler
from pathlib import Path

from tuneforge.errors import ConfigError, TuneforgeError

__all__ = ["quiet", "safetensors_problem", "reading"]


@contextlib.contextmanager
def quiet(transformers):
    """No "Loading weights" bar of transformers' own in the middle of tuneforge's output, and its log held back
    until the block succeeds: a failed load is then one error line, not a load report followed by the error."""
    logging = transformers.utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    root, held = logging.get_logger(), BufferingHandler(1 << 20)
    handlers, root.handlers = root.handlers, [held]
    try:
        yield
        for record in held.buffer:  # success: what it had to say, as it would have said it
            for handler in handlers:
                handler.handle(record)
    finally:
        root.handlers = handlers
        if shown:
            logging.enable_progress_bar()


def safetensors_problem(f: Path) -> str | None:
    """What safetensors finds wrong with a file's framing (it checks that the file covers every tensor its header
    lists, reading the header only), else None: a cut-off copy is caught here, not deep inside the loader."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt"):
            return None
    except Exception as exc:  # safetensors raises its own error type, and OSError for an unreadable file
        return f"is truncated or damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


@contextlib.contextmanager
def reading(spec: str, what: str):
    """What transformers, safetensors or torch raise about a folder they cannot read, as one ConfigError naming
    the folder, the file and the fix."""
    from safetensors import SafetensorError
    try:
        yield
    except TuneforgeError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "mismatched" in first:  # its own text points at a load report held back by quiet
            first = "config.json gives other tensor shapes than the weight files hold"
        raise ConfigError(f"--model {spec}: transformers cannot load its {what} ({first}); the folder is incomplete "
                          "or damaged: copy or download it again, or save the model again with save_pretrained"
                          ) from None
