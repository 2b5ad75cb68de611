"""A model trained on ``--model hf:PATH`` written back as a Hugging Face folder: ``tuneforge export-hf RUN OUT``.

The result is what ``save_pretrained`` writes (config, safetensors weights, the source folder's tokenizer files),
so transformers, PEFT-free serving stacks and other tools load it as they load the original. Weights a run
changed (fine-tuned blocks) are written as trained; a LoRA is folded into its layer's weight first. GPT-2's
layers go back to transformers' ``Conv1D`` layout (weight (in, out)).

What cannot become a plain causal LM is refused with the reason: adapters and soft prompts (extra modules, not a
change of weights; export their folders or keep the run), and a replaced head (a classifier or reward head).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from tuneforge.parts.modules import names as part_names
from tuneforge.errors import ConfigError
from tuneforge.common.names import check_export, write_export

__all__ = ["export_hf", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _check_exportable(model, lora: str | None) -> list[str]:
    """The LoRAs to fold in; refuses what a causal LM folder cannot hold."""
    from tuneforge.models.hf import HFCausalLM
    from tuneforge.plugins.lora.layer import lora_layers
    if not isinstance(model, HFCausalLM):
        raise ConfigError("export-hf: this model was not trained on a Hugging Face model (--model hf:PATH); the "
                          "embedded model has no transformers class to load it into")
    held = part_names(model)
    for kind in ("adapters", "soft prompts"):
        if held.get(kind):
            raise ConfigError(f"export-hf: the model holds {kind} {', '.join(held[kind])}, modules a plain "
                              f"transformers model has no place for; keep them as tuneforge parts (load_model, "
                              f"or their folders in the checkpoint)")
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.out_features != model.config.vocab_size:
        raise ConfigError(f"export-hf: the model's head is a {type(model.lm_head).__name__}, not the language-model "
                          "head, so it is no longer a causal LM; use the checkpoint with tuneforge.load_model")
    loras = sorted({n for _, m in lora_layers(model) for n in m.task_names()})
    if lora is not None:
        if lora not in loras:
            raise ConfigError(f"export-hf: no LoRA named '{lora}'; the model holds {', '.join(loras) or 'none'}")
        return [lora]
    if len(loras) > 1:
        raise ConfigError(f"export-hf: the model holds LoRAs {', '.join(loras)}; say which to fold in with --lora NAME")
    return loras


def export_hf(source, out: str | Path, *, lora: str | None = None, force: bool = False) -> Path:
    """Write ``source`` (a model trained on ``hf:PATH``, or its checkpoint / run folder) to folder ``out`` as a
    Hugging Face model, LoRA ``lora`` (default: the only one) folded into the weights. Returns ``out``.

    ``out`` may be new, empty or an earlier export, which is replaced; another folder is refused with nothing
    changed unless ``force`` (see :func:`tuneforge.common.names.write_export`); a file is always refused."""
    from tuneforge.models import hf
    from tuneforge.engine.loop import load_model
    from tuneforge.plugins.lora.layer import merge, unmerge

    check_export(out, command="export-hf", force=force)  # before loading a model that may take minutes
    model = source if isinstance(source, torch.nn.Module) else load_model(source)
    folded = _check_exportable(model, lora)
    transformers = hf._transformers()
    config = copy.deepcopy(model.hf_model.config)
    if model.lm_head.weight is not model.tok_emb.weight:  # finetune untied the head: keep it its own weight
        config.tie_word_embeddings = False
    target = transformers.AutoModelForCausalLM.from_config(config)  # the original layer types
    conv1d = {p for p, m in target.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)}
    if folded:
        merge(model, folded)
    try:
        ours = {n: t for n, t in model.state_dict().items()}
        state = {}
        for name in target.state_dict():
            if name not in ours:
                raise ConfigError(f"export-hf: the model has no tensor {name}, which {type(target).__name__} needs")
            t = ours[name].detach().to("cpu", copy=True)  # a copy: the unmerge below changes the weights in place
            state[name] = t.t().contiguous() if name.rpartition(".")[0] in conv1d and t.dim() == 2 else t
    finally:
        if folded:
            unmerge(model, folded)  # a model passed in comes back as it was
    target.load_state_dict(state, strict=True)
    target.to(dtype=next(model.parameters()).dtype)

    tokenizer_files = [Path(model.config.hf) / name for name in TOKENIZER_FILES]

    def fill(tmp: Path) -> None:
        with hf._quiet(transformers):
            target.save_pretrained(str(tmp))
        for f in tokenizer_files:
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)

    return write_export(out, fill, command="export-hf", force=force)
