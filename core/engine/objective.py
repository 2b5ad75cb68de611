"""Which registered plugin is a run's objective: the one whose ``tuneforge_data`` and ``tuneforge_loss`` count."""
from __future__ import annotations

from typing import Any

import pluggy

from tuneforge import hookspecs
from tuneforge.errors import PluginError

__all__ = ["choose_objective"]


def choose_objective(pm: pluggy.PluginManager, plugins: dict[str, Any]) -> str | None:
    """The plugin whose ``data`` and ``loss`` the run uses, of ``plugins`` (name -> instance, in registration order)
    registered in ``pm``; refuses two objectives or a split one.

    A plugin may offer a *default* objective by marking its objective hooks ``trylast=True`` (prompt tuning
    does: with nothing else named, it learns the data as given). A default is used only when no plugin offers a
    regular one, and then the first named wins; two regular ones are an error. A plugin class with
    ``objective_yields = True`` (finetune) has a regular objective that gives way to another plugin's regular one.
    """
    owners: dict[str, tuple[list[str], list[str]]] = {}
    for hook in hookspecs.OBJECTIVE_HOOKS:
        order = {n: i for i, n in enumerate(plugins)}
        impls = sorted(getattr(pm.hook, hook).get_hookimpls(), key=lambda i: order[i.plugin_name])
        regular = [i.plugin_name for i in impls if not i.trylast]
        firm = [n for n in regular if not getattr(plugins[n], "objective_yields", False)]
        regular = firm or regular  # those that yield count only when no other plugin brings an objective
        defaults = [i.plugin_name for i in impls if i.trylast]
        if len(regular) > 1:
            raise PluginError(
                f"mechanisms {' and '.join(map(repr, regular))} both implement '{hook}': a run has exactly one "
                "objective. Keep one of them; parameterisations (lora, adapter, prompt-tuning) combine with any "
                "single objective."
            )
        owners[hook] = (regular, defaults)
    regular = {h: r for h, (r, _) in owners.items() if r}
    if regular:
        chosen = set(r[0] for r in regular.values())
        missing = [h for h in hookspecs.OBJECTIVE_HOOKS if h not in regular]
        if len(chosen) > 1 or missing:
            parts = ", ".join(f"'{h}' by {r[0]!r}" for h, r in regular.items())
            raise PluginError(
                f"the run's objective is split: {parts}{' and nobody implements ' + repr(missing[0]) if missing else ''}."
                f" One plugin implements {' and '.join(hookspecs.OBJECTIVE_HOOKS)} together."
            )
        return chosen.pop()
    defaults = [d for d in owners[hookspecs.OBJECTIVE_HOOKS[0]][1]
                if all(d in owners[h][1] for h in hookspecs.OBJECTIVE_HOOKS)]
    return defaults[0] if defaults else None
