"""Reading and batching data: records (``builtin:NAME``, ``.txt``, ``.jsonl``) validated before training, the embedded
data world, labelled records and templates, rankings, and the padding and per-epoch order shared by objectives.

Layer: above ``engine``. Imports only ``common`` and ``tuneforge.errors`` (today it needs nothing of the engine).
"""
