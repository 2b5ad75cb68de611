"""A model trained on ``--model hf:PATH`` written back as a Hugging Face folder: ``tuneforge export-hf RUN OUT``.

The result is what ``save_pretrained`` writes (config, safetensors weights, the source folder's tokenizer files
and chat template),
so transformers, PEFT-free serving stacks and other tools load it as they load the original. Weights a run
changed (fine-tuned blocks) are written as trained; a part that is a change of weights (a LoRA) is folded into
its layer's weight first. GPT-2's layers go back to transformers' ``Conv1D`` layout (weight (in, out)).

Which parts fold is the plugins' to say: a plugin class whose parts fold into the base weights sets

- ``fold_kind``: the ``kind`` of the :class:`tuneforge.parts.modules.TaskModule` that holds them;
- ``fold_noun``: what one part is called in messages (``"LoRA"``: "no LoRA named ...");
- ``fold_into_base(model, names)`` and ``unfold_from_base(model, names)``: take the named parts into the weights
  and out again (the model passed in comes back as it was).

Every other part a model holds cannot become a plain causal LM and is refused with the reason (adapters and soft
prompts: extra modules, not a change of weights; export their folders or keep the run), and so is a replaced
head (a classifier or reward head).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from tuneforge.parts.modules import names as part_names
from tuneforge.errors import ConfigError
from tuneforge.common.names import check_export, write_export

__all__ = ["export_hf", "folding_plugins", "TOKENIZER_FILES"]

# Everything transformers' tokenizer reads from a folder, chat templates included (``apply_chat_template`` needs
# them: transformers 5 saves the template as chat_template.jinja, older versions inside tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates")


def folding_plugins() -> dict[str, type]:
    """``TaskModule`` kind -> the installed plugin class whose parts of that kind fold into the base weights."""
    from tuneforge.engine.registry import offering

    found: dict[str, type] = {}
    for _, cls in offering("fold_kind", accept=lambda kind: isinstance(kind, str) and bool(kind)):
        found.setdefault(cls.fold_kind, cls)  # tuneforge's own first
    return found


def _check_exportable(model, chosen: str | None) -> list[tuple[type, list[str]]]:
    """(plugin class, names) of the parts to fold in; refuses what a causal LM folder cannot hold."""
    from tuneforge.models.hf import HFCausalLM
    if not isinstance(model, HFCausalLM):
        raise ConfigError("export-hf: this model was not trained on a Hugging Face model (--model hf:PATH); the "
                          "embedded model has no transformers class to load it into")
    held = {kind: names for kind, names in part_names(model).items() if names}
    folds = folding_plugins()
    for kind in sorted(held):
        if kind not in folds:
            raise ConfigError(f"export-hf: the model holds {kind} {', '.join(held[kind])}, modules a plain "
                              f"transformers model has no place for; keep them as tuneforge parts (load_model, "
                              f"or their folders in the checkpoint)")
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.out_features != model.config.vocab_size:
        raise ConfigError(f"export-hf: the model's head is a {type(model.lm_head).__name__}, not the language-model "
                          "head, so it is no longer a causal LM; use the checkpoint with tuneforge.load_model")
    foldable = sorted({name for kind in held for name in held[kind]})
    nouns = sorted({folds[kind].fold_noun for kind in held} or {p.fold_noun for p in folds.values()})
    noun = " or ".join(nouns) or "part"
    if chosen is not None:
        if chosen not in foldable:
            raise ConfigError(f"export-hf: no {noun} named '{chosen}'; the model holds {', '.join(foldable) or 'none'}")
        foldable = [chosen]
    elif len(foldable) > 1:
        raise ConfigError(f"export-hf: the model holds {noun}s {', '.join(foldable)}; say which to fold in with "
                          "--lora NAME")
    return [(folds[kind], [n for n in foldable if n in held[kind]]) for kind in sorted(held)
            if any(n in held[kind] for n in foldable)]


def export_hf(source, out: str | Path, *, lora: str | None = None, force: bool = False) -> Path:
    """Write ``source`` (a model trained on ``hf:PATH``, or its checkpoint / run folder) to folder ``out`` as a
    Hugging Face model, part ``lora`` (a LoRA, or another part that folds; default: the only one) folded into the
    weights. Returns ``out``.

    ``out`` may be new, empty or an earlier export, which is replaced; another folder is refused with nothing
    changed unless ``force`` (see :func:`tuneforge.common.names.write_export`); a file is always refused."""
    from tuneforge.models import hf, hf_reading
    from tuneforge.engine.loop import load_model

    check_export(out, command="export-hf", force=force)  # before loading a model that may take minutes
    model = source if isinstance(source, torch.nn.Module) else load_model(source)
    folded = _check_exportable(model, lora)
    transformers = hf._transformers()
    config = copy.deepcopy(model.hf_model.config)
    if model.lm_head.weight is not model.tok_emb.weight:  # finetune untied the head: keep it its own weight
        config.tie_word_embeddings = False
    target = transformers.AutoModelForCausalLM.from_config(config)  # the original layer types
    conv1d = {p for p, m in target.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)}
    for plugin, names in folded:
        plugin.fold_into_base(model, names)
    try:
        ours = {n: t for n, t in model.state_dict().items()}
        state = {}
        for name in target.state_dict():
            if name not in ours:
                raise ConfigError(f"export-hf: the model has no tensor {name}, which {type(target).__name__} needs")
            t = ours[name].detach().to("cpu", copy=True)  # a copy: the unmerge below changes the weights in place
            state[name] = t.t().contiguous() if name.rpartition(".")[0] in conv1d and t.dim() == 2 else t
    finally:
        for plugin, names in reversed(folded):
            plugin.unfold_from_base(model, names)  # a model passed in comes back as it was
    target.load_state_dict(state, strict=True)
    target.to(dtype=next(model.parameters()).dtype)

    tokenizer_files = [Path(model.config.hf) / name for name in TOKENIZER_FILES]

    def fill(tmp: Path) -> None:
        with hf_reading.quiet(transformers):
            target.save_pretrained(str(tmp))
        for f in tokenizer_files:
            if (tmp / f.name).exists():  # save_pretrained's own (generation_config.json)
                continue
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir():  # additional_chat_templates/: one .jinja file per named template
                shutil.copytree(f, tmp / f.name)

    return write_export(out, fill, command="export-hf", force=force)
