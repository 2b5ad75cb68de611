"""Helpers with no knowledge of models or runs: typed option parsing (``options``), safe names and paths that stay
inside folders tuneforge owns (``names``), and the version (``version``).

Layer: the bottom, beside ``kernels``. Imports only ``tuneforge.errors`` and the standard library.
"""
