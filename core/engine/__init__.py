"""The engine: one training loop that knows hooks, not mechanisms. Finding plugins (``registry``), the run's options
(``config``) and ``run`` object, assembling the model, the defaults sized to it, precision, the optimizer step,
checkpoints, the run folder, torchrun/DDP/FSDP2 and the frozen-weights proof.

Layer: above ``models``. May import ``models``, ``kernels``, ``common``, ``tuneforge.hookspecs`` and
``tuneforge.errors``; never data, objectives or a plugin (what a run trains on comes through the hooks).
"""
