"""``tuneforge models``: what ``--model`` can name without a download, as a table for people (the data comes from
:func:`tuneforge.models.factory.available`; ``--json`` prints that as it is)."""
from __future__ import annotations

__all__ = ["render"]


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
