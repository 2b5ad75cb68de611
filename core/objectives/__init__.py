"""The objectives plugins delegate to (data, loss and evaluation of a run): next-token prediction (:class:`TextTask`),
classification by label words or by a head, and the default objective a parameterisation offers.

Layer: above ``data``. Imports ``data``, ``models``, ``common``, ``tuneforge.hookspecs`` and ``tuneforge.errors``.
"""
