"""Assembling a run's model: the base weights, each mechanism's changes in turn, then what trains. A saved
model is rebuilt the same way, so a fine-tuned head, soft prompts or adapters come back as they were saved.

A checkpoint records its *lineage*: for every run that shaped the model (the ``--init`` chain, oldest first),
the options of the mechanisms that changed its structure (those implementing ``tuneforge_modify_model``).
Rebuilding replays those changes on a fresh base and then loads the weights, strictly. A plugin that was given as
an object rather than installed is found among the classes the caller gives (see ``plugin_objects``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine import defaults
from tuneforge.engine.config import TrainConfig, checkpointing_every
from tuneforge.errors import CheckpointError, ConfigError, TuneforgeError
from tuneforge.models import checkpointing, factory
from tuneforge.engine.plugin_objects import given_classes, not_found
from tuneforge.engine.registry import (Registered, build_manager, call_impl, discover, including, installed_classes,
                                       objectives_installed)
from tuneforge.engine.run import Run
from tuneforge.models.protocol import prefix_length
from tuneforge.models.tokenizer import tokenizer_of

__all__ = ["Assembled", "assemble", "build_model", "load_model", "device_of", "lineage_entry"]


@dataclasses.dataclass
class Assembled:
    reg: Registered
    run: Run
    model: torch.nn.Module
    params: list[torch.nn.Parameter]  # what trains, in model order
    base_lineage: list[dict]  # the --init model's lineage; the run's own entry is added when it saves
    base_classes: dict[str, str] = dataclasses.field(default_factory=dict)  # the --init model's plugin objects

    def lineage(self) -> list[dict]:
        entry = lineage_entry(self.reg)
        return self.base_lineage + ([entry] if entry else [])

    def plugin_classes(self) -> dict[str, str]:
        """name -> ``module:qualname`` of every plugin given as an object to this run or to those of its lineage
        (recorded in the checkpoint, for the message that says which class rebuilding it needs)."""
        return {**self.base_classes, **self.reg.classes}


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA, but this torch ({torch.__version__}) sees no CUDA "
                          "device; use --device cpu (or auto)")
    return device


def lineage_entry(reg: Registered) -> dict:
    """Options of this run's named mechanisms that change the model's structure (read at save time, so options
    a plugin resolved while setting up, such as inferred labels, are what gets replayed)."""
    options = reg.options()
    return {n: options[n] for n, _ in reg.ordered_impls("tuneforge_modify_model") if n in reg.mechanisms}


def _modify(reg: Registered, model: torch.nn.Module, run: Run) -> torch.nn.Module:
    """Each plugin changes the model in turn (registration order); one may return a replacement."""
    for _, fn in reg.ordered_impls("tuneforge_modify_model"):
        replaced = call_impl(fn, model=model, run=run)
        if replaced is not None:
            model = replaced
    return model


def _rebuild(found: Path, state: dict, device: torch.device, plugins=()) -> torch.nn.Module:
    """The model saved in checkpoint ``found`` (``state``: its state.json, read once by the caller): base, its
    lineage's changes replayed, weights loaded strictly. ``plugins``: classes or objects for the plugins of its
    lineage that are not installed."""
    train_values = {k: v for k, v in state.get("train", {}).items() if k != "mechanisms"}
    try:
        cfg = TrainConfig.build(train_values, source=str(found / ckpt.STATE_FILE))
    except TuneforgeError:
        cfg = TrainConfig(batch_size=defaults.SCRATCH_BATCH)  # a plugin rebuilding its head may read it
    model, mcfg = factory.build(state["model_config"], seed=cfg.seed, pretrained=bool(state.get("folder_weights")))
    installed = discover()
    available = including(given_classes(plugins, installed_classes(installed)), installed)
    for entry in state.get("lineage", []):
        for name in entry:
            if name not in available:
                raise CheckpointError(f"{found}: its model was shaped by {', '.join(entry)}; "
                                      f"{not_found(name, state.get('plugin_classes', {}).get(name))}")
        try:
            reg = build_manager(list(entry.items()), available=available, autoload=False)
        except TuneforgeError as exc:
            raise CheckpointError(
                f"{found}: its model was shaped by {', '.join(entry)}; rebuilding it failed: {exc}"
            ) from None
        run = Run(cfg, mcfg, tokenizer_of(model), device, reg.plugins, reg.hook, objective=reg.objective,
                  checkpoint=found)
        model = _modify(reg, model, run)
    ckpt.load_weights(found, model, state=state)
    return model


def build_model(cfg: TrainConfig, device: torch.device | None = None
                ) -> tuple[torch.nn.Module, factory.Description, list]:
    """The base model: ``--init``'s model as it was saved (heads, prompts... included), else the one ``--model``
    names (a preset, seeded random init, or a Hugging Face folder). Returns (model, its config, its lineage)."""
    return _base(cfg, device)[:3]


def _base(cfg: TrainConfig, device: torch.device | None) -> tuple[torch.nn.Module, factory.Description, list, dict]:
    """:func:`build_model`, and the ``--init`` checkpoint's record of plugin objects (name -> class path)."""
    if not cfg.init:
        # The device picks a kind's default dtype (bfloat16 for an HF model on CUDA): only where the run computes in
        # bfloat16 anyway; under fp32 a float32 folder would otherwise train on weights rounded to bfloat16.
        model, mcfg = factory.build(cfg.model, seed=cfg.seed, device=device if cfg.precision != "fp32" else None)
        return model, mcfg, [], {}
    init, state = ckpt.open_checkpoint(cfg.init)
    if cfg.model and not factory.same_architecture(cfg.model, state["model_config"]):
        raise ConfigError(
            f"--model {cfg.model} differs from the architecture of --init {init}; drop --model "
            "(the checkpoint's architecture is used) or start from a matching checkpoint"
        )
    # the run's plugin objects rebuild the --init model's plugins of the same name (the same objects on --resume)
    model = _rebuild(init, state, device or torch.device("cpu"), plugins=cfg.mechanisms)
    torch.manual_seed(cfg.seed)  # the run's own new modules start from its seed, whatever --init was
    return model, model.config, list(state.get("lineage", [])), dict(state.get("plugin_classes", {}))


def load_model(path: str | Path, *, device: str = "cpu", plugins=()) -> torch.nn.Module:
    """The model saved in a checkpoint (or a run folder's latest one), in eval mode, with every change its
    mechanisms made (a classification head, soft prompts...) rebuilt and loaded.

    :param plugins: plugin classes (or objects, whose class is used) for a run trained with plugin objects that are
        not installed as entry points: each rebuilds the saved plugin of its declared ``name``, from the options the
        checkpoint recorded. Installed plugins are found without it; a class given here takes precedence.
    :raises CheckpointError: a plugin the model needs is neither installed nor given (the message names its class).
    """
    found, state = ckpt.open_checkpoint(path)
    return _rebuild(found, state, device_of(device), plugins=plugins).to(device_of(device)).eval()


def assemble(cfg: TrainConfig, *, out: Path | None = None, resume: Path | None = None, parallel=None) -> Assembled:
    """Register the run's plugins, build the model, let each plugin change it, and decide what trains.

    :param parallel: this process's :class:`tuneforge.engine.distributed.Parallel` (its device and rank), under torchrun.

    Nothing is read from the data or written here; ``tuneforge_validate`` runs last so a plugin can refuse.
    """
    reg = build_manager(cfg.mechanisms)
    device = parallel.device if parallel is not None else device_of(cfg.device)
    model, mcfg, lineage, base_classes = _base(cfg, device)
    pretrained = bool(cfg.init) or getattr(mcfg, "weights", None) == "pretrained"
    # The batch size first: a plugin may read data while it changes the model (a head sized from the labels).
    sized = defaults.resolve(cfg, mcfg, pretrained=pretrained, only_new=None, device=device)
    run = Run(sized.config, mcfg, tokenizer_of(model), device, reg.plugins, reg.hook, out=out, objective=reg.objective,
              checkpoint=resume, rank=getattr(parallel, "rank", 0), world_size=getattr(parallel, "world_size", 1))
    base_params = {id(p) for p in model.parameters()}
    model = _modify(reg, model, run)
    run.model_config, run.tokenizer = model.config, tokenizer_of(model)  # a plugin may have replaced the model
    run.prefix_tokens = prefix_length(model)
    model.to(device)

    chosen: set[int] = set()
    answered = False
    for name, fn in reg.ordered_impls("tuneforge_trainable_params"):
        answer = call_impl(fn, model=model, run=run)
        if answer is None:
            continue
        answered = True
        mine = {id(p): p for p in answer}
        run.trainable[name] = sum(p.numel() for p in mine.values())
        chosen.update(mine)
    if not answered:
        raise ConfigError("no plugin in this run said which parameters to train (tuneforge_trainable_params)")
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    params = [p for p in model.parameters() if p.requires_grad]
    chosen_defaults = defaults.resolve(sized.config, run.model_config, pretrained=pretrained,
                                       only_new=not any(id(p) in base_params for p in params), device=device,
                                       prefix_tokens=run.prefix_tokens)
    run.config = chosen_defaults.config
    for line in sized.lines + chosen_defaults.lines:
        run.log(f"default {line}")
    if params and reg.objective is None:
        who = ", ".join(f"{n} ({c:,})" for n, c in run.trainable.items() if c)
        raise ConfigError(
            f"{who} would train parameters, but no mechanism in this run says what to optimise (none implements "
            f"tuneforge_data and tuneforge_loss). Add an objective: {', '.join(objectives_installed()) or 'none installed'}."
        )
    # after every plugin's change (a replaced model, inserted parts): the blocks as they will train
    recomputed = checkpointing.apply(model, checkpointing_every(run.config.checkpointing))
    run.summary["checkpointed_blocks"] = recomputed
    if recomputed:
        run.log(f"checkpointing: blocks {', '.join(map(str, recomputed))} of {len(model.blocks)} recompute their "
                "activations in the backward")
    reg.hook.tuneforge_validate(run=run, model=model)
    return Assembled(reg, run, model, params, lineage, base_classes)
