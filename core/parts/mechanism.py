"""What ``adapter``, ``lora`` and ``prompt-tuning`` share: named parts that are trained, loaded, saved and routed.

Each inserts per-task modules into a frozen model, trains some named parts (``tasks=``) and loads others
(``load=``: a saved part, a folder of them, a checkpoint or a run folder), writes each part into every checkpoint
(``<subdir>/``) and offers the default objective. A mechanism subclasses :class:`PartMechanism` and says only what
is its own: which modules hold its parts, how a new part is made, and how a part is turned into tensors and back.
Parts are stored as part folders (``<subdir>/<name>/``, see :mod:`tuneforge.parts.files`) unless the mechanism
overrides the storage seams (``prompt-tuning``: one safetensors file per prompt).

On ``--resume`` and when a saved model is rebuilt (``load_model``, ``--init``), ``run.checkpoint`` is set and
the parts are re-created from that checkpoint's own part folders (the weights are then loaded over them), so
nothing depends on the original ``load=`` paths still existing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Optional

import torch

from tuneforge.engine import checkpoint as ckpt
from tuneforge.parts.files import fingerprint_note, is_part, read_part, save_part
from tuneforge.parts.modules import TaskModule
from tuneforge.errors import CheckpointError, ConfigError
from tuneforge.hookspecs import hookimpl
from tuneforge.common.names import check_name, inside
from tuneforge.objectives.default import DefaultObjective, ObjectiveOptions

__all__ = ["PartOptions", "PartMechanism", "part_generator"]


@dataclasses.dataclass
class PartOptions(ObjectiveOptions):
    tasks: Optional[list[str]] = None  # parts to train (new, or loaded ones to continue); default 'default'
    # saved part folders, checkpoint or run folders; PATH@NAME loads the one part at PATH under the name NAME
    load: list[str] = dataclasses.field(default_factory=list)
    layers: list[str] = dataclasses.field(default_factory=lambda: ["all"])  # blocks: all, 0,2, 1-3, -1 (last)

    def __post_init__(self):
        super().__post_init__()
        if self.tasks is not None:
            self.tasks = [t for t in self.tasks if t]
        for t in self.tasks or []:
            check_name(t, what="task name", where="option tasks")


def part_generator(seed: int, name: str) -> torch.Generator:
    """The generator a new part starts from: the run's seed and the part's name (two parts never share one)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))


class PartMechanism(DefaultObjective):
    """Base of ``adapter``, ``lora`` and ``prompt-tuning``; see the module docstring. Subclasses set ``mechanism``
    and ``subdir``, and ``point_fields``: what each insertion point in a part's manifest must say (see
    :func:`tuneforge.parts.files.read_part`). One that stores its parts otherwise overrides the storage seams
    (:meth:`is_saved`, :meth:`saved_in`, :meth:`read_saved`, :meth:`write_saved`, :meth:`restore`,
    :meth:`base_note`) and says in ``saved_one`` / ``saved_many`` what its messages call one saved part and several."""

    mechanism = ""
    subdir = ""
    point_fields: dict = {}
    saved_one = ""  # default: "saved <mechanism> folder"
    saved_many = ""  # default: "saved <mechanism>"

    def __init__(self, options):
        self.options = options
        self.objective_owner = self.mechanism
        self.trained: list[str] = []

    # -- what a mechanism says about itself ---------------------------------------------------------------------

    def part_modules(self, model) -> list[TaskModule]:
        raise NotImplementedError

    def create(self, model, run, name: str) -> None:
        """Insert a new, untrained part ``name`` (identity at init) where the options say."""
        raise NotImplementedError

    def export(self, model, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors by insertion point, points: path -> sizes) of part ``name``."""
        raise NotImplementedError

    def install(self, model, name: str, manifest: dict, tensors: dict[str, torch.Tensor], where: Path) -> None:
        """Insert a saved part; check that every insertion point fits before changing anything."""
        raise NotImplementedError

    def read_foreign(self, path: Path) -> list[tuple[str, dict, dict, Path]] | None:
        """Parts in another ecosystem's layout at ``path`` (LoRA: PEFT), or None when it is not one."""
        return None

    def saved_options(self) -> dict:
        skip = set(f.name for f in dataclasses.fields(ObjectiveOptions)) | {"tasks", "load"}
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k not in skip}

    # -- how parts are stored: part folders, unless a mechanism overrides these --------------------------------

    def is_saved(self, path: Path) -> bool:
        """Whether ``path`` is one saved part."""
        return is_part(path)

    def saved_in(self, folder: Path) -> list[Path]:
        """The saved parts directly inside ``folder``, in the order they load."""
        return sorted(p for p in folder.iterdir() if is_part(p))

    def read_saved(self, where: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(name, manifest, tensors) of the part saved at ``where``; a ConfigError for anything malformed, before
        anything is installed. The name must be a valid name (it names a file of every later checkpoint)."""
        manifest, tensors = read_part(where, mechanism=self.mechanism, point_fields=self.point_fields)
        return manifest["name"], manifest, tensors

    def write_saved(self, model, name: str, folder: Path) -> None:
        """Write part ``name`` into ``folder``, a checkpoint's ``subdir``."""
        tensors, points = self.export(model, name)
        save_part(inside(folder, name), mechanism=self.mechanism, name=name, tensors=tensors, points=points,
                  options=self.saved_options(), model=model)

    def restore(self, model, checkpoint: Path) -> None:
        """Re-create the parts ``checkpoint`` holds (on --resume, or when a saved model is rebuilt); the
        checkpoint's weights are loaded over them afterwards."""
        own = checkpoint / self.subdir
        if own.is_dir():
            self.load_into(model, str(own), skip_held=True)

    def base_note(self, manifest: dict, model, where: Path) -> str | None:
        """A note when the part at ``where`` was trained on a base of other shapes (that it still fits), else None."""
        return fingerprint_note(manifest, model, where)

    # -- shared --------------------------------------------------------------------------------------------

    def held(self, model) -> list[str]:
        out: list[str] = []
        for m in self.part_modules(model):
            out.extend(n for n in m.task_names() if n not in out)
        return out

    def _parts_in(self, spec: str) -> list[tuple[str, dict, dict, Path]]:
        """The parts at ``spec``; ``PATH@NAME`` loads the one part there under the name NAME. Every name that
        comes out is a valid name (each becomes a folder of every later checkpoint)."""
        rename = None
        if "@" in spec and not Path(spec).exists():
            spec, rename = spec.rsplit("@", 1)
            check_name(rename, what=f"{self.mechanism} part name", where=f"load={spec}@{rename}")
        found = self._parts_at(spec)
        if rename is not None:
            if len(found) != 1:
                raise ConfigError(f"{self.mechanism}: {spec} holds {len(found)} parts "
                                  f"({', '.join(f[0] for f in found)}); @{rename} can rename only one")
            _, manifest, tensors, where = found[0]
            found = [(rename, {**manifest, "name": rename}, tensors, where)]
        for name, _, _, where in found:  # a foreign folder's name (PEFT: the folder's own) is checked here too
            check_name(name, what=f"{self.mechanism} part name", where=f"{where} (load={spec}; rename it with "
                       f"load={spec}@NAME)")
        return found

    def _parts_at(self, spec: str) -> list[tuple[str, dict, dict, Path]]:
        path = Path(spec)
        foreign = self.read_foreign(path) if path.is_dir() else None
        if foreign is not None:
            return foreign
        return [(*self.read_saved(where), where) for where in self.saved_at(spec)]

    def saved_at(self, spec: str) -> list[Path]:
        """The saved parts at ``spec``: one part, a folder holding them (directly or in ``subdir``), or a
        checkpoint or run folder (the latest checkpoint's ``subdir``)."""
        path = Path(spec)
        if self.is_saved(path):
            return [path]
        checkpoint = (path / ckpt.STATE_FILE).is_file()
        if (path / self.subdir).is_dir() and not checkpoint:
            found = path / self.subdir  # a folder holding saved parts
        elif path.is_dir() and not checkpoint and self.saved_in(path):
            found = path
        else:
            try:
                found = ckpt.resolve_checkpoint(path) / self.subdir
            except CheckpointError:
                raise ConfigError(f"{self.mechanism}: load={spec} is neither a "
                                  f"{self.saved_one or f'saved {self.mechanism} folder'} nor a checkpoint or run "
                                  f"folder with {self.subdir}/") from None
        parts = self.saved_in(found) if found.is_dir() else []
        if not parts:
            raise ConfigError(f"{self.mechanism}: {found} holds no {self.saved_many or f'saved {self.mechanism}'}; "
                              f"was that run a {self.mechanism} run?")
        return parts

    def load_into(self, model, spec: str, *, skip_held: bool = False, log=None) -> list[str]:
        """Install the parts found at ``spec`` on ``model``; returns their names. A name the model already holds
        is an error (or skipped with ``skip_held``); a part from a base of other shapes is noted via ``log``."""
        loaded = []
        for name, manifest, tensors, where in self._parts_in(spec):
            if name in self.held(model):
                if skip_held:
                    continue
                raise ConfigError(f"{self.mechanism}: two parts named '{name}' (from {where} and already on "
                                  "the model); load only one of them")
            self.install(model, name, manifest, tensors, where)
            note = self.base_note(manifest, model, where)
            if note and log is not None:
                log(note)
            loaded.append(name)
        return loaded

    @classmethod
    def load_frozen(cls, model, *specs: str) -> list[str]:
        """Load saved parts of this mechanism onto ``model``, frozen (what ``load_lora`` / ``load_adapters`` do);
        returns their names. The rest of the model stays as it was."""
        mech, names = cls(cls.Options()), []
        for spec in specs:
            names += mech.load_into(model, spec, log=lambda note: warnings.warn(note, stacklevel=4))
        for m in mech.part_modules(model):
            for n in names:
                for p in m.part_parameters(n) if n in m.task_names() else []:
                    p.requires_grad_(False)
        return names

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        o = self.options
        if run.checkpoint is not None:  # resume / rebuild: the checkpoint's own parts, weights loaded after
            self.restore(model, run.checkpoint)
        else:
            for spec in o.load:
                self.load_into(model, spec, log=run.log)
        tasks = o.tasks if o.tasks is not None else ([] if o.load else ["default"])
        for name in tasks:
            if name not in self.held(model):
                self.create(model, run, name)
        self.trained = list(tasks)
        # One trained part runs on unrouted rows; with several (mixed data routes each row) or none (serving
        # loaded parts), nothing is chosen, and a module holding several asks the caller to choose.
        for m in self.part_modules(model):
            m.active = tuple(tasks) if len(tasks) == 1 else None

    @hookimpl
    def tuneforge_validate(self, run):
        """Several parts trained by this mechanism's own objective need records that name their task; said now,
        before anything is written, rather than at the first step."""
        if len(self.trained) < 2 or not run.is_objective(self):
            return
        task = self.objective_task(run)
        data = None
        if hasattr(task, "read"):  # labelled records can name their task; plain text cannot
            task.read(run)
            data = task.train
        if data is None or not data.mixed:
            raise ConfigError(
                f"{self.mechanism}: tasks={','.join(self.trained)} trains {len(self.trained)} parts, so each record of "
                f"{run.config.data} must say which one it trains (a '{self.options.task_field}' field naming one of "
                "them); train one part per run otherwise")

    @hookimpl
    def tuneforge_trainable_params(self, model):
        return [p for m in self.part_modules(model) for n in self.trained if n in m.task_names()
                for p in m.part_parameters(n)]

    @hookimpl
    def tuneforge_save(self, model, run, path):
        for name in self.held(model):
            check_name(name, what=f"{self.mechanism} part name", where=f"saving {Path(path) / self.subdir}")
            self.write_saved(model, name, Path(path) / self.subdir)

    @hookimpl
    def tuneforge_run_start(self, run, model):
        if self.trained:
            count = sum(p.numel() for p in self.tuneforge_trainable_params(model))
            run.log(f"{self.mechanism}: training {', '.join(self.trained)} ({count:,} parameters); the base model "
                    "is frozen")
