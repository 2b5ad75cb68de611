"""Tables for people of what is installed: ``tuneforge models`` (from :func:`tuneforge.models.factory.available`),
``tuneforge plugins`` and ``tuneforge plugins NAME`` (from the registry's ``PluginInfo.as_dict``). ``--json`` prints
the same data as it is."""
from __future__ import annotations

__all__ = ["render", "render_plugins", "render_plugin", "kind_of"]


def render(found: dict) -> str:
    """The listing of :func:`~tuneforge.models.factory.available`: presets, named models, forms for local files."""
    lines = ["presets: the embedded transformer, random init (pretrain it first)"]
    for p in found["presets"]:
        lines.append(f"  {p['name']:<14} {p['params'] / 1e6:6.1f}M  {p['n_layers']} layers, d_model {p['d_model']}, "
                     f"{p['n_heads']} heads, context {p['max_seq_len']}" + ("  (the default)" if p["default"] else ""))
    lines.append("named models: pretrained, offline once installed")
    for m in found["named"]:
        state = (f"installed, {'converted' if m['converted'] else 'converted on first use (tens of seconds)'}"
                 if m["installed"] else f"not installed: {m['install']}")
        lines += [f"  {m['name']:<14} {m['params'] / 1e6:6.1f}M  {state}", f"  {'':<14} {m['about']}"]
    lines.append("your own files")
    lines += [f"  {f['form']:<14} {f['about']}" for f in found["local"]]
    lines.append(f"options: {found['options']}")
    lines.append(f"converted files are cached in {found['cache']} (set TUNEFORGE_CACHE to move it)")
    return "\n".join(lines)


def kind_of(info) -> str:
    """autoload, mechanism (changes what trains or how the model runs), objective or default-objective."""
    loss = getattr(info.obj, "tuneforge_loss", None)
    if info.autoload:
        return "autoload"
    if loss is None:
        return "mechanism"
    # a loss marked trylast is a default objective: used when the run brings no other
    return "default-objective" if getattr(loss, "tuneforge_impl", {}).get("trylast") else "objective"


def render_plugins(infos: dict) -> str:
    """Every plugin of ``infos`` (name -> PluginInfo): package, version, kind, status, description and hooks."""
    lines = []
    for info in infos.values():
        status = "ok" if info.loaded else f"ERROR: {info.error}"
        kind = kind_of(info) if info.loaded else ""
        lines.append(f"{info.name:<16} {info.package} {info.version:<10} {kind:<17} {status}")
        if info.loaded:
            hooks = info.as_dict()["hooks"]
            lines.append(f"{'':<16} {info.description}")
            lines.append(f"{'':<16} hooks: {', '.join(h.removeprefix('tuneforge_') for h in hooks)}")
    lines.append("'tuneforge plugins NAME' (or -m NAME:help) shows a plugin's options.")
    return "\n".join(lines)


def render_plugin(info) -> str:
    """One plugin: what it is, its hooks, and a table of its options (name, type, default, help)."""
    if not info.loaded:
        return f"{info.name} ({info.package} {info.version}): failed to load: {info.error}"
    d = info.as_dict()
    lines = [f"{info.name} ({info.package} {info.version}, {kind_of(info)}): {info.description}",
             f"hooks: {', '.join(h.removeprefix('tuneforge_') for h in d['hooks'])}"]
    rows = d["options"]
    if not rows:
        lines.append("options: none")
        return "\n".join(lines)
    lines.append(f"options (-m {info.name}:key=value,...; in a TOML config, a table [mechanisms.{info.name}]):")
    table = [("name", "type", "default", "help")]
    table += [(r["name"], r["type"], "(required)" if r["required"] else _shown(r["default"]), r["help"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines)


def _shown(value) -> str:
    """A default as a user would write it after -m: lists with commas, none, true/false."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(_shown, value)) if value else "(empty)"
    return str(value) if value != "" else "''"
