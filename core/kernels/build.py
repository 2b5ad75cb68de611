"""How tuneforge's C++/CUDA kernels are built: one description drives both builds.

``SOURCES`` lists the translation units (few: a cold build on 2 cores takes about a minute per unit). The
ahead-of-time build in ``setup.py`` compiles them into the extension ``tuneforge._C``; where no such module was
installed, :func:`jit_load` compiles the same sources with ninja into a cache folder on first use (later imports
reuse it). CUDA units are built only where torch itself has CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SOURCES", "CUDA_SOURCES", "CXX_FLAGS", "NVCC_FLAGS", "csrc", "sources", "cache_dir", "jit_load"]

SOURCES = ["ops.cpp", "attention.cpp"]  # CPU kernels and the op schemas (TORCH_LIBRARY)
CUDA_SOURCES: list[str] = []  # added by the CUDA kernels
# -march=native: the kernels are compiled on the machine that runs them (editable install or JIT). The math flags
# let reductions and the exp loops vectorize; they keep inf and NaN semantics (no -ffinite-math-only).
CXX_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
             "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]


def csrc() -> Path:
    """The csrc/ folder: beside the package in a source checkout (editable installs), else shipped inside it."""
    here = Path(__file__).resolve().parent  # core/kernels
    for candidate in (here.parents[1] / "csrc", here / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"tuneforge's C++ sources (csrc/{SOURCES[0]}) are not beside {here}")


def sources(*, cuda: bool) -> list[str]:
    root = csrc()
    return [str(root / s) for s in SOURCES + (CUDA_SOURCES if cuda else [])]


def cache_dir() -> Path:
    base = os.environ.get("TUNEFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tuneforge")
    import torch

    tag = f"torch{torch.__version__.split('+')[0]}-{'cuda' if torch.version.cuda else 'cpu'}"
    path = Path(base) / "kernels" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def jit_load() -> None:
    """Compile (or reuse) the kernels with ninja and load them; the ops then appear under ``torch.ops.tuneforge``."""
    import torch
    from torch.utils.cpp_extension import load

    cuda = torch.version.cuda is not None and bool(CUDA_SOURCES)
    load(name="tuneforge_C", sources=sources(cuda=cuda), build_directory=str(cache_dir()),
         extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, is_python_module=False, verbose=False)
