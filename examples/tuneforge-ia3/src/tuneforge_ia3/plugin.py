"""``ia3``: the tuneforge mechanism. Learned vectors rescale the keys, the values and the MLP's inner activation
of a frozen model (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"); only the vectors train.

Hooks, in the order a run calls them:

- ``tuneforge_modify_model``: puts :class:`~tuneforge_ia3.layer.IA3Linear` layers where the options say (and
  where a checkpoint or ``load=`` folder had them). Deterministic: on ``--resume`` and whenever a saved model is
  rebuilt (``load_model``, ``--init``) it runs again with ``run.checkpoint`` set, and puts a vector wherever the
  checkpoint's model file holds one; the engine then loads the weights over them.
- ``tuneforge_trainable_params``: the vectors of the layers it placed (found by structure, kept from the step
  before); the engine freezes everything else.
- ``tuneforge_validate``: refuses a run in which a later mechanism replaced one of its layers (or the model).
- ``tuneforge_save``: ``ia3/`` in every checkpoint (:mod:`tuneforge_ia3.files`), what ``load=`` reads.
- ``tuneforge_run_start`` / ``tuneforge_run_end``: a line on what trains; how far the vectors moved, in the summary.
- ``tuneforge_data`` / ``tuneforge_loss`` / ``tuneforge_evaluate`` (from :class:`tuneforge.objectives.default.DefaultObjective`,
  marked ``trylast``): with no other objective in the run, learn the data as given; any other objective wins.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch

from tuneforge.sdk import ConfigError, DefaultObjective, ObjectiveOptions, family_of, hookimpl, plugin_hooks, suggest

from .files import FOLDER, read_ia3, save_ia3, saved_shapes
from .placement import ROLES, Point, ia3_layers, install, plan, points_for, vectors

__all__ = ["IA3"]


class IA3(DefaultObjective):
    """IA³: learned vectors rescale keys, values and MLP activations; the base model is frozen."""

    objective_owner = "ia3"

    @dataclasses.dataclass
    class Options(ObjectiveOptions):
        targets: list[str] = dataclasses.field(default_factory=lambda: list(ROLES))  # of k, v, mlp
        layers: list[str] = dataclasses.field(default_factory=lambda: ["all"])  # blocks: all, 0,2, 1-3, -1 (last)
        init: float = 1.0  # the value new vectors start at; 1 leaves the model exactly as it was
        load: Optional[str] = None  # an IA³ folder, or a checkpoint / run folder holding ia3/
        freeze: bool = False  # keep the loaded vectors as they are (serve them, or train soft prompts on top)

        def __post_init__(self):
            super().__post_init__()
            self.targets = list(dict.fromkeys(t for t in self.targets if t))  # once each, in the order given
            if not self.targets:
                raise ValueError("targets must name at least one of k, v, mlp")
            for t in self.targets:
                if t not in ROLES:
                    raise ValueError(f"targets: {t!r} is not an IA³ role{suggest(t, ROLES)}; IA³ scales k (keys), "
                                     "v (values) and mlp (the MLP's inner activation)")
            if not math.isfinite(self.init):
                raise ValueError(f"init must be a finite number, got {self.init}")
            if self.freeze and not self.load:
                raise ValueError("freeze=true keeps loaded vectors fixed: give load=PATH too (an IA³ folder, or a "
                                 "checkpoint or run folder with ia3/)")

    def __init__(self, options: Options):
        self.options = options
        self.trained: list[Point] = []  # the vectors this run trains
        self._params: list[torch.nn.Parameter] = []
        self._layers: dict[str, torch.nn.Module] = {}  # path -> the IA³ layer placed there
        self._blocks_seen: set[int] = set()
        self._start: list[torch.Tensor] = []
        self._reserve = 0

    # -- hooks -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        o = self.options
        if run.checkpoint is not None:
            # Resume or rebuild: a vector wherever the saved model file holds one (the weights are loaded over them
            # right after), so nothing depends on load= still being there.
            install(model, points_for(model, saved_shapes(run.checkpoint), where=str(run.checkpoint)), init=o.init)
        elif o.load:
            self._load(model, run)
        self.trained = [] if o.freeze else install(model, plan(model, o.targets, o.layers), init=o.init)
        self._params = vectors(model, self.trained)
        self._layers = dict(ia3_layers(model))
        self._blocks_seen = {id(m) for m in model.blocks.modules()}

    def _load(self, model, run) -> None:
        tensors, _, folder = read_ia3(self.options.load)
        points = points_for(model, {k: tuple(t.shape) for k, t in tensors.items()}, where=str(folder))
        held = {f"{path}.ia3.{role}" for path, layer in ia3_layers(model) for role in layer.ia3}
        clash = [p.name for p in points if p.name in held]
        if clash:
            raise ConfigError(f"ia3: load={self.options.load} brings {clash[0]}, which the model holds already (from "
                              "--init); continue training those with plain -m ia3, or start from the base model")
        install(model, points, where=str(folder))
        with torch.no_grad():
            for vector, p in zip(vectors(model, points), points):
                vector.copy_(tensors[p.name])
        run.log(f"ia3: loaded {len(points)} vectors from {folder}")

    @hookimpl
    def tuneforge_trainable_params(self):
        return list(self._params)

    @hookimpl
    def tuneforge_validate(self, run, model):
        alive = {id(m) for m in model.modules()}
        gone = [path for path, layer in self._layers.items() if id(layer) not in alive]
        if gone:
            more = f" and {len(gone) - 1} more layers" if len(gone) > 1 else ""
            raise ConfigError(
                f"ia3: {gone[0]}{more} no longer hold their IA³ layer: a mechanism after ia3 "
                f"({', '.join(self._later(run)) or 'another plugin'}) replaced it or the model. Name ia3 after it "
                "(-m that -m ia3), or give them different layers")
        blocks = family_of(model).blocks
        changed = [f"{blocks}.{p}" for p, m in model.blocks.named_modules() if id(m) not in self._blocks_seen]
        if changed and self._layers:
            # Their layer matching sees IA³ layers as what they are (not plain linear layers), so a layer both
            # asked for went to ia3 alone; worth a line, since the other mechanism may not have said so.
            run.log(f"ia3: {', '.join(self._later(run))} changed the blocks after ia3 (e.g. {changed[0]}); layers "
                    "holding IA³ are not linear layers to it, so a layer both target keeps only IA³")
        if run.is_objective(self):  # positions a soft prompt takes before the input, when our objective reads data
            reserves = [p.objective_reserve() for p in run.plugins.values()
                        if p is not self and isinstance(p, DefaultObjective)]
            self._reserve = max(reserves, default=0)

    def _later(self, run) -> list[str]:
        names = list(run.plugins)
        me = next(n for n, p in run.plugins.items() if p is self)
        return [n for n in names[names.index(me) + 1:] if "tuneforge_modify_model" in plugin_hooks(run.plugins[n])]

    @hookimpl
    def tuneforge_run_start(self, run, model):
        # Read from the model, not from the list kept since modify_model: under FSDP the engine swaps the
        # parameters for sharded ones, and hands these hooks the model with whole tensors.
        self._start = [p.detach().clone() for p in vectors(model, self.trained)]
        if self._params:
            count = sum(p.numel() for p in self._params)
            run.log(f"ia3: training {len(self._params)} vectors ({', '.join(self.options.targets)}; {count:,} "
                    "parameters); every weight of the model is frozen")
        elif self._layers:
            run.log(f"ia3: {len(self._layers)} layers hold frozen IA³ vectors (freeze=true)")

    @hookimpl
    def tuneforge_save(self, run, path, model):
        if ia3_layers(model):
            save_ia3(model, Path(path) / FOLDER, options=self.saved_options())

    @hookimpl
    def tuneforge_run_end(self, model, summary):
        moved = [(p.detach().float() - s.float()).abs() for p, s in zip(vectors(model, self.trained), self._start)]
        summary["ia3"] = {
            "vectors": len(self._params), "parameters": sum(p.numel() for p in self._params),
            # how far training moved them: 0.0 would mean the vectors never learned anything
            "mean_abs_change": float(torch.cat(moved).mean()) if moved else 0.0,
        }

    # -- the default objective ----------------------------------------------------------------------------------

    def objective_reserve(self) -> int:
        return self._reserve

    def saved_options(self) -> dict:
        skip = {f.name for f in dataclasses.fields(ObjectiveOptions)}
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k not in skip}
