"""IA³ for tuneforge: learned vectors that rescale a frozen model's keys, values and MLP activations.

``pip install`` this package and ``tuneforge train -m ia3`` finds it through the entry point
``ia3 = "tuneforge_ia3:IA3"`` in the group ``tuneforge``. The modules, each with one job:

- :mod:`tuneforge_ia3.layer`: :class:`IA3Linear`, the layer and its math;
- :mod:`tuneforge_ia3.placement`: where the vectors go, through tuneforge's families table;
- :mod:`tuneforge_ia3.files`: the ``ia3/`` folder (safetensors + JSON) a checkpoint holds;
- :mod:`tuneforge_ia3.plugin`: :class:`IA3`, the mechanism (options and hooks);
- :mod:`tuneforge_ia3.apply`: add, load and merge from Python.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tuneforge-ia3")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.1.0"

from .apply import add_ia3, load_ia3, merge
from .files import ia3_state, read_ia3, save_ia3
from .layer import IA3Linear
from .placement import ROLES, Point, ia3_layers, plan
from .plugin import IA3

__all__ = ["IA3", "IA3Linear", "ROLES", "Point", "plan", "ia3_layers", "add_ia3", "load_ia3", "merge", "ia3_state",
           "save_ia3", "read_ia3", "__version__"]
