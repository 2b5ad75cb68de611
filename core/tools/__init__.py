"""The ``tuneforge`` command and what only it runs: the CLI, the demo, ``new-plugin`` (the scaffold), tiny Hugging Face
folders, ``export-hf`` and the offline model catalogue (``tuneforge models``).

Layer: the top (only ``tuneforge.__main__`` is above). May import any layer below, but no plugin's module: what a
command needs from a mechanism it finds on the discovered plugin classes (an attribute) or through a hook.
"""
