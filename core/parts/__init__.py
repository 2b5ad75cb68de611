"""Named per-task parts on one frozen base model, shared by adapters, LoRA and soft prompts: task modules and which
parts a forward applies (``modules``), part folders on disk (``files``) and :class:`PartMechanism`, the base of the
mechanisms that train, load, save and route such parts.

Layer: above ``objectives``. Imports ``objectives``, ``engine`` (checkpoint lookup), ``models`` and the layers below.
"""
