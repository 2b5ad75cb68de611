"""``adapter``: bottleneck adapters on a block's sub-layers (serial or parallel), many named ones per point.

The mechanism as a folder, like the IA³ example:

- ``layer.py``: :class:`Bottleneck` and :class:`AdapterPoint` (the per-sub-layer holder and its forward hook);
- ``plugin.py``: :class:`Adapter`, the plugin (options, placement, hooks) on :class:`tuneforge.sdk.PartMechanism`.

It imports tuneforge only through :mod:`tuneforge.sdk`.
"""
from .layer import PLACEMENTS, AdapterPoint, Bottleneck, adapter_points
from .plugin import Adapter, add_adapter, insertion_points, load_adapters

__all__ = ["Adapter", "add_adapter", "load_adapters", "insertion_points", "Bottleneck", "AdapterPoint",
           "adapter_points", "PLACEMENTS"]
