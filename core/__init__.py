"""tuneforge: one engine for every way of training or steering a language model; each mechanism is a plugin.

Plugin authors need :data:`hookimpl` (the marker for hook implementations) and the hook contract in
:mod:`tuneforge.hookspecs`. Users call :func:`train` (the Python face of ``tuneforge train``)::

    import tuneforge
    result = tuneforge.train(model="tiny", mechanisms=["pretrain"], data="builtin:text", steps=300, out="runs/a")
    result.model, result.metrics["eval/loss"]
"""
from tuneforge.common.version import __version__
from tuneforge.hookspecs import hookimpl, hookspec
from tuneforge.engine.config import TrainConfig
from tuneforge.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, PluginError, TuneforgeError
from tuneforge.engine.run import Run
from tuneforge.engine.loop import TrainResult, train, load_model

__all__ = [
    "hookimpl", "hookspec", "train", "load_model", "TrainConfig", "TrainResult", "Run",
    "TuneforgeError", "ConfigError", "PluginError", "DataError", "CheckpointError", "NonFiniteLossError",
    "__version__",
]
