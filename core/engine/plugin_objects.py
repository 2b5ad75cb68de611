"""Plugin objects: plugins given as instances (``tuneforge.train(mechanisms=[MyPlugin(options)])``) or classes
(``load_model(path, plugins=[MyPlugin])``) instead of named as installed entry points.

Such a plugin registers under the ``name`` its class declares (what ``tuneforge new-plugin`` writes, and what its
entry point will be called once installed). A checkpoint records every plugin by that name with its options, and
the ``module:qualname`` of the classes given as objects. Rebuilding the model (``load_model``, ``--init``) finds a
name among the installed entry points, else among the classes the caller passes; the recorded class is never
imported on its own: a checkpoint is data, and reading it runs no code it names. The recorded path goes into the
error that says which class to pass.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from typing import Any

from tuneforge.errors import ConfigError

__all__ = ["class_path", "object_name", "check_object", "given_classes", "not_found"]

# What users type after -m: a letter, then letters, digits, '-' and '_' (':', ',' and '=' mean something there).
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def class_path(cls: type) -> str:
    """``package.module:Qualified.Name`` of a class, as entry points write it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def object_name(plugin: Any, installed: dict[type, str]) -> str:
    """The name a plugin object (or class) registers under: its ``name`` attribute; else the entry-point name its
    class is installed under; else its lower-cased class name, with a warning (a checkpoint records plugins by
    name, so a name nobody declared is one that ``load_model`` finds only when given the class again).

    :param installed: class -> entry-point name of the installed plugins.
    :raises ConfigError: a declared name that ``-m`` could not spell.
    """
    cls = plugin if inspect.isclass(plugin) else type(plugin)
    declared = getattr(plugin, "name", None)
    entry = installed.get(cls)
    if isinstance(declared, str):
        if not _NAME.match(declared):
            raise ConfigError(f"plugin {class_path(cls)} declares name {declared!r}: a name starts with a letter and "
                              "holds only letters, digits, '-' and '_' (what users type after -m); change it")
        if entry is not None and entry != declared:
            warnings.warn(f"plugin {class_path(cls)} declares name '{declared}' but is installed as '{entry}'; "
                          f"registered as '{entry}', the name load_model finds. Make the two the same.", stacklevel=3)
            return entry
        return declared
    if entry is not None:
        return entry
    fallback = cls.__name__.lower()
    warnings.warn(
        f"plugin object {class_path(cls)} declares no name; registered as '{fallback}'. Checkpoints record plugins by "
        f"name: set name = \"...\" on the class (the entry-point name it will be installed under), or load its runs "
        f"with load_model(path, plugins=[{cls.__name__}]).", stacklevel=3)
    return fallback


def check_object(plugin: Any, name: str) -> None:
    """A plugin object whose class declares ``Options`` keeps them as ``self.options``: the checkpoint records them
    from there, and ``load_model`` rebuilds the plugin as ``Class(options)`` from the record.

    :raises ConfigError: it does not, with the fix.
    """
    options_cls = getattr(type(plugin), "Options", None)
    if dataclasses.is_dataclass(options_cls) and not isinstance(getattr(plugin, "options", None), options_cls):
        raise ConfigError(
            f"plugin object '{name}' ({class_path(type(plugin))}): its class declares Options, but the object keeps "
            f"none as .options; store the options it is built with (self.options = options in __init__): checkpoints "
            "record them from there so the run can be rebuilt")


def given_classes(plugins, installed: dict[type, str]) -> dict[str, type]:
    """name -> class of plugins given as classes or instances (``load_model(plugins=)``, a run's plugin objects)."""
    out: dict[str, type] = {}
    for plugin in plugins or ():
        if isinstance(plugin, (str, tuple)):
            continue  # named plugins are found among the installed ones
        cls = plugin if inspect.isclass(plugin) else type(plugin)
        with warnings.catch_warnings():  # registering it said so already; a class passed to load_model needs none
            warnings.simplefilter("ignore")
            out[object_name(plugin, installed)] = cls
    return out


def not_found(name: str, recorded: str | None) -> str:
    """What to do about a plugin a saved model needs that is neither installed nor given."""
    if recorded is None:
        return (f"its plugin '{name}' is not installed: install the package that provides the entry point '{name}' "
                "(see 'tuneforge plugins'), or pass its class: load_model(path, plugins=[TheClass])")
    cls = recorded.rpartition(":")[2].rpartition(".")[2]
    return (f"its plugin '{name}' was a plugin object of class {recorded}, which is not installed as an entry point: "
            f"pass the class, load_model(path, plugins=[{cls}]) (or, for --init, the object in this run's mechanisms), "
            f"or install a package whose entry point '{name}' names it")
