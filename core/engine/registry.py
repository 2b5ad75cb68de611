"""Finding plugins (entry-point group ``tuneforge``) and building the PluginManager of one run.

Built-in mechanisms are found exactly like third-party ones: through the entry points of installed
distributions. A plugin that fails to import is recorded with its error and skipped, unless
``TUNEFORGE_STRICT_PLUGINS=1``. ``TUNEFORGE_LOAD_PLUGINS=a,b`` loads only the named third-party plugins
('' loads none); tuneforge's own built-ins are part of the package and always load.

A plugin is a class. Optional class attributes:

- ``Options``: a dataclass of typed options, filled from ``NAME:key=value`` or a TOML table;
  the class is then built as ``Plugin(options)``, otherwise as ``Plugin()``.
- ``autoload = True``: registered in every run without being named (progress bars, loggers).
- ``name``: the name an instance of it registers under when given as an object (see ``plugin_objects``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import traceback
from importlib import metadata
from typing import Any

import pluggy

from tuneforge import hookspecs
from tuneforge.errors import ConfigError, PluginError
from tuneforge.common.options import build_options, option_rows, parse_spec, suggest
from tuneforge.engine.objective import choose_objective
from tuneforge.engine.plugin_objects import check_object, class_path, object_name

__all__ = ["GROUP", "PluginInfo", "discover", "hook_names", "plugin_hooks", "build_manager", "Registered", "call_impl",
           "takes", "objectives_installed", "check_class", "offering", "installed_classes", "including", "spec_hint"]

GROUP = "tuneforge"
OWN_DISTRIBUTION = "tuneforge"


@dataclasses.dataclass
class PluginInfo:
    """One entry point of the group, loaded or not."""

    name: str
    value: str  # "package.module:Class"
    package: str  # the distribution that declared it
    version: str
    builtin: bool
    obj: Any = None  # the loaded class; None when it failed
    error: str | None = None

    @property
    def loaded(self) -> bool:
        return self.obj is not None

    @property
    def autoload(self) -> bool:
        return bool(getattr(self.obj, "autoload", False))

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.obj) if self.obj is not None else None
        return doc.splitlines()[0] if doc else ""

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "entry_point": self.value,
            "builtin": self.builtin,
            "autoload": self.autoload,
            "status": "loaded" if self.loaded else "error",
            "error": self.error,
            "hooks": plugin_hooks(self.obj) if self.loaded else [],
            "description": self.description,
            "options": option_rows(getattr(self.obj, "Options", None)) if self.loaded else [],
        }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _allowlist() -> set[str] | None:
    raw = os.environ.get("TUNEFORGE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def discover(*, strict: bool | None = None) -> dict[str, PluginInfo]:
    """Load every entry point of the group ``tuneforge``; return ``name -> PluginInfo``.

    Broken plugins are kept in the result with ``error`` set (``tuneforge plugins`` shows them) and are not
    usable. With ``strict`` (default: ``TUNEFORGE_STRICT_PLUGINS``) the first broken plugin raises.
    """
    strict = _env_flag("TUNEFORGE_STRICT_PLUGINS") if strict is None else strict
    allow = _allowlist()
    found: dict[str, PluginInfo] = {}
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        builtin = package == OWN_DISTRIBUTION
        if not builtin and allow is not None and ep.name not in allow:
            continue
        info = PluginInfo(ep.name, ep.value, package, version, builtin)
        if ep.name in found:
            other = found[ep.name]
            info.error = f"name '{ep.name}' is already taken by {other.package} ({other.value}); rename one entry point"
        else:
            try:
                info.obj = ep.load()
                if not inspect.isclass(info.obj):
                    raise TypeError(f"entry point must name a class, got {type(info.obj).__name__}")
                _check_hooks(info.obj, ep.name)
            except Exception as exc:  # any import-time failure of someone else's code
                info.obj = None  # reported as the traceback's last line; our own checks say more
                info.error = str(exc) if isinstance(exc, PluginError) else \
                    traceback.format_exception_only(exc)[-1].strip()
        if info.error and strict:
            raise PluginError(
                f"plugin '{ep.name}' from {package} {version} ({ep.value}) failed to load: {info.error}. "
                "Drop --strict-plugins (or unset TUNEFORGE_STRICT_PLUGINS) to skip broken plugins, leave it out with "
                "--plugins NAME,... or --no-plugins, or fix/uninstall the package."
            )
        # A clash keeps the first plugin usable and lists the second under its package, with the error.
        found[ep.name if ep.name not in found else f"{ep.name} ({package})"] = info
    return found


def hook_names() -> dict[str, list[str]]:
    """The hooks of the spec with their argument names, in lifecycle order."""
    out = {}
    for name, fn in vars(hookspecs).items():
        if name.startswith("tuneforge_") and callable(fn):
            out[name] = list(inspect.signature(fn).parameters)
    return out


def _impls(obj) -> list[tuple[str, Any]]:
    """(attribute name, function) of every method marked ``@tuneforge.hookimpl``."""
    marker = hookspecs.PROJECT + "_impl"
    out = []
    for attr in dir(obj):
        if attr.startswith("__"):
            continue
        try:
            fn = getattr(obj, attr)
        except Exception:
            continue
        if callable(fn) and hasattr(fn, marker):
            out.append((getattr(fn, marker, {}).get("specname") or attr, fn))
    return out


def plugin_hooks(obj) -> list[str]:
    """Names of the hooks a plugin (class or instance) implements, in lifecycle order."""
    order = list(hook_names())
    names = {n for n, _ in _impls(obj)}
    return [n for n in order if n in names] + sorted(names - set(order))


@functools.lru_cache(maxsize=256)
def takes(fn) -> frozenset[str]:
    """The argument names of a hook implementation (read once per function)."""
    return frozenset(inspect.signature(fn).parameters)


def call_impl(fn, **kwargs):
    """Call one hook implementation with the subset of ``kwargs`` it takes (as pluggy does). The signature is
    read once per function: the engine calls the objective's loss this way on every micro-batch."""
    names = takes(fn)
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def _where(fn) -> str:
    fn = inspect.unwrap(fn)
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def _check_hooks(obj, name: str) -> None:
    """Every hookimpl names a hook of the spec and takes only its arguments; else a PluginError with the fix."""
    spec = hook_names()
    for hook, fn in _impls(obj):
        if hook not in spec:
            raise PluginError(
                f"plugin '{name}' at {_where(fn)}: '{hook}' is not a tuneforge hook{suggest(hook, spec)}. "
                f"Hooks: {', '.join(spec)}"
            )
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        extra = [p for p in params if p not in spec[hook]]
        if extra:
            raise PluginError(
                f"plugin '{name}' at {_where(fn)}: hook '{hook}' has argument(s) {', '.join(map(repr, extra))} "
                f"that the spec does not pass; it passes ({', '.join(spec[hook])}). "
                "Take only those arguments (by name, any subset)."
            )


@dataclasses.dataclass
class Registered:
    """The plugins of one run: their manager and the instances by name, in registration order."""

    pm: pluggy.PluginManager
    plugins: dict[str, Any]
    autoloaded: list[str] = dataclasses.field(default_factory=list)  # registered without being named
    objective: str | None = None  # the plugin whose data and loss the run uses (None: the run trains nothing)
    classes: dict[str, str] = dataclasses.field(default_factory=dict)  # given as objects: name -> module:qualname

    @property
    def mechanisms(self) -> list[str]:
        """The plugins the run named, in order."""
        return [n for n in self.plugins if n not in self.autoloaded]

    @property
    def hook(self):
        return self.pm.hook

    def ordered_impls(self, hook: str) -> list[tuple[str, Any]]:
        """(plugin name, function) implementing ``hook``, in registration order (pluggy calls LIFO)."""
        order = {n: i for i, n in enumerate(self.plugins)}
        impls = sorted(getattr(self.pm.hook, hook).get_hookimpls(), key=lambda i: order[i.plugin_name])
        return [(i.plugin_name, i.function) for i in impls]

    def objective_impl(self, hook: str):
        """The objective plugin's implementation of ``hook`` (``tuneforge_data`` / ``tuneforge_loss``); the
        engine calls it directly, as the one implementation that counts (defaults that lost are skipped)."""
        if self.objective is None:
            return None
        for i in getattr(self.pm.hook, hook).get_hookimpls():
            if i.plugin_name == self.objective:
                return i.function
        return None

    def options(self) -> dict[str, dict]:
        """name -> options as a plain dict (for config.json and the summary)."""
        out = {}
        for name, plugin in self.plugins.items():
            opts = getattr(plugin, "options", None)
            out[name] = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
        return out


def check_class(plugin_cls, name: str, values: dict | None = None, how=None) -> None:
    """Check a plugin class as discovery does: every hookimpl is a hook of the spec taking only its arguments, and
    its ``Options`` build from ``values`` (default: from their defaults; ``how(missing)`` says how to give required
    ones). Raises :class:`PluginError` / :class:`ConfigError` with the fix."""
    _check_hooks(plugin_cls, name)
    _instantiate(plugin_cls, name, values, how)


def installed_classes(available: dict[str, PluginInfo]) -> dict[type, str]:
    """class -> entry-point name of the loaded plugins of ``available``."""
    return {info.obj: name for name, info in available.items() if info.loaded and info.package != _GIVEN}


def including(classes: dict[str, type], available: dict[str, PluginInfo] | None = None) -> dict[str, PluginInfo]:
    """The installed plugins (default: :func:`discover`) and ``classes`` (name -> class, given by the caller, as
    ``load_model(plugins=)`` gives them); a given class takes the place of an installed plugin of the same name."""
    out = dict(discover() if available is None else available)
    for name, cls in classes.items():
        _check_hooks(cls, name)
        out[name] = PluginInfo(name, class_path(cls), _GIVEN, "", False, obj=cls)
    return out


_GIVEN = "(given as a class or object)"  # the package of a PluginInfo made by including()


def spec_hint(name: str):
    """``how`` for required options of mechanism ``name``: the -m flag, the spec string and the TOML table."""
    def how(missing: list[str]) -> str:
        spec = f"{name}:" + ",".join(f"{o}=..." for o in missing)
        return (f"pass -m {spec} (tuneforge.train(mechanisms=[\"{spec}\"]), or {missing[0]} = ... under "
                f"[mechanisms.{name}] in a TOML config)")
    return how


def offering(attribute: str, accept=bool) -> list[tuple[str, type]]:
    """(name, class) of each loaded plugin whose class declares ``attribute`` with a value ``accept`` takes,
    tuneforge's own first, then by name. How core learns what a mechanism offers (folding its parts into the
    weights, writing PEFT folders, being the objective tiny test runs add) without naming one."""
    found = sorted((not info.builtin, name, info.obj) for name, info in discover().items()
                   if info.loaded and accept(getattr(info.obj, attribute, None)))
    return [(name, obj) for _, name, obj in found]


def _instantiate(info_obj, name: str, values: dict | None, how=None):
    options_cls = getattr(info_obj, "Options", None)
    options = build_options(options_cls, values, owner=f"mechanism '{name}'", subject=name, how=how or spec_hint(name))
    try:
        return info_obj(options) if options_cls is not None else info_obj()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"mechanism '{name}': {exc}") from None


def build_manager(requests, *, available: dict[str, PluginInfo] | None = None, autoload: bool = True) -> Registered:
    """Register the run's plugins in a PluginManager of its own and validate the combination.

    :param requests: mechanisms in order, each a ``"NAME:key=value,..."`` string, a ``(name, dict)`` pair, or
        an already-built plugin object (registered as is, under its declared ``name``: see ``plugin_objects``).
    :param available: discovered plugins (default: :func:`discover`).
    :param autoload: also register every discovered plugin marked ``autoload`` that was not named.
    :raises ConfigError, PluginError: unknown mechanism or option, a hook not in the spec, an argument not in
        the spec, two objectives or one split over two plugins. (No objective is fine for a run that trains
        nothing, e.g. ``prompting``; the engine refuses it once something would train.)
    """
    available = discover() if available is None else available
    chosen: list[tuple[str, Any]] = []
    classes: dict[str, str] = {}
    for req in requests:
        if isinstance(req, str):
            name, values = parse_spec(req)
        elif isinstance(req, tuple) and len(req) == 2 and isinstance(req[0], str):
            name, values = req[0], dict(req[1] or {})
        else:
            name = object_name(req, installed_classes(available))
            _check_hooks(req, name)
            check_object(req, name)
            chosen.append((name, req))
            classes[name] = class_path(type(req))
            continue
        info = available.get(name)
        if info is None:
            usable = sorted(n for n, i in available.items() if i.loaded and not i.autoload)
            raise ConfigError(
                f"unknown mechanism '{name}'{suggest(name, usable)}. Installed: {', '.join(usable) or 'none'}. "
                "Run 'tuneforge plugins' to see every plugin and its load status."
            )
        if not info.loaded:
            raise PluginError(f"mechanism '{name}' from {info.package} {info.version} failed to load: {info.error}")
        chosen.append((name, _instantiate(info.obj, name, values)))
    names = [n for n, _ in chosen]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"mechanism(s) named more than once: {', '.join(dupes)}; give each once with all its options")
    autoloaded = []
    if autoload:
        for name, info in available.items():
            if info.loaded and info.autoload and name not in names:
                chosen.append((name, _instantiate(info.obj, name, None)))
                autoloaded.append(name)

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins: dict[str, Any] = {}
    for name, plugin in chosen:
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # _check_hooks catches most; this is pluggy's own word
            raise PluginError(f"plugin '{name}': {exc}") from None
        plugins[name] = plugin
    pm.check_pending()
    reg = Registered(pm, plugins, autoloaded, classes=classes)
    reg.objective = choose_objective(pm, plugins)
    return reg


def objectives_installed(available: dict[str, PluginInfo] | None = None) -> list[str]:
    """Names of the installed plugins that can be a run's objective (for error messages)."""
    available = discover() if available is None else available
    return sorted(n for n, i in available.items() if i.loaded and hookspecs.OBJECTIVE_HOOKS[0] in plugin_hooks(i.obj))
