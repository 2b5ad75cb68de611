"""Built-in plugins. Each registers through the entry-point group ``tuneforge`` like any third-party one."""
__all__: list[str] = []
