"""tuneforge's version, in a module that imports nothing.

Written into part manifests and export markers. It lives here rather than in the package root because the root
imports the engine, and the bottom layer (``common``) must not reach back up to it.
"""
__all__ = ["__version__"]

__version__ = "0.1.0"
