"""Prefix tuning and SimPO for tuneforge, as a third-party package of two mechanisms.

``pip install`` this package and ``tuneforge train -m prefix`` / ``-m simpo`` find them through the entry points
``prefix = "tuneforge_prefix:PrefixTuning"`` and ``simpo = "tuneforge_prefix:SimPO"`` in the group ``tuneforge``.
The modules, each with one job:

- :mod:`tuneforge_prefix.prefixes`: :class:`Prefixes`, the module in a model's ``kv_prefix`` attention slot;
- :mod:`tuneforge_prefix.plugin`: :class:`PrefixTuning`, the ``prefix`` mechanism (options and hooks);
- :mod:`tuneforge_prefix.simpo`: :class:`SimPO`, the ``simpo`` objective, and its loss.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tuneforge-prefix")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.1.0"

from .plugin import PrefixTuning
from .prefixes import Prefix, Prefixes
from .simpo import SimPO, average_logprobs, simpo_loss

__all__ = ["PrefixTuning", "Prefix", "Prefixes", "SimPO", "simpo_loss", "average_logprobs", "__version__"]
