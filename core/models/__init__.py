"""The language models: the :class:`LanguageModel` protocol every mechanism relies on (``protocol``), the embedded
transformer and the Hugging Face wrapper behind it, GGUF files and named models (``gguf``), tokenizers, generation and
sampling, architecture families, per-row task routing, next-token losses and log-probs without the full logits
(``lm_loss``), activation checkpointing, and ``factory`` (a model's name or saved description -> a model).

Layer: above ``kernels`` and ``common``. Imports those, ``tuneforge.errors``, and nothing of runs or mechanisms.
"""
