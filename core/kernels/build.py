"""How tuneforge's C++/CUDA kernels are built: one description drives both builds.

``SOURCES`` lists the translation units (few: a cold build on 2 cores takes about a minute per unit). The
ahead-of-time build in ``setup.py`` compiles them into the extension ``tuneforge._C``; where no such module was
installed, :func:`jit_load` compiles the same sources with ninja into a cache folder on first use (later imports
reuse it). CUDA units are built only where torch itself has CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SOURCES", "HEADERS", "CUDA_SOURCES", "CXX_FLAGS", "LINK_FLAGS", "NVCC_FLAGS", "csrc", "sources", "include_dirs", "with_cuda",
           "cache_dir", "jit_load"]

SOURCES = ["ops.cpp", "attention.cpp"]  # CPU kernels and the op schemas (TORCH_LIBRARY)
#: headers the units include (attention.cpp compiles attention_isa.h once per instruction set; ops.cpp runs its
#: row chunks through adapter_rows.h, and includes linear_ce.h, the fused linear + cross-entropy)
HEADERS = ["attention_simd.h", "attention_isa.h", "adapter_rows.h", "linear_ce.h"]
# CUDA kernels (no torch headers, so nvcc checks them anywhere) and their torch bindings; built where torch has CUDA
CUDA_SOURCES = ["cuda/kernels.cu", "cuda/ops_cuda.cpp"]
# No -march=native: a build must run on any x86-64 CPU (a wheel, a shared cache, a cluster of mixed nodes). The
# attention kernels carry AVX-512 and AVX2 code in `#pragma GCC target` regions and pick one at run time
# (csrc/attention_simd.h). The math flags let reductions vectorize; they keep inf and NaN semantics (no
# -ffinite-math-only), which the attention masks rely on.
# -fopenmp: at::parallel_for is a header template that runs its body serially unless the unit is compiled with
# OpenMP, so without it every kernel here would use one thread. The extension then needs libgomp.so.1, which
# resolves to the copy torch has already loaded (same soname): one OpenMP runtime, sized by torch.set_num_threads.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]


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


def include_dirs() -> list[str]:
    return [str(csrc() / "cuda")]


def with_cuda() -> bool:
    """Build the CUDA units: torch has CUDA and a toolkit (nvcc) is found."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and bool(CUDA_SOURCES)


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

    cuda = with_cuda()
    load(name="tuneforge_C", sources=sources(cuda=cuda), build_directory=str(cache_dir()),
         extra_cflags=CXX_FLAGS, extra_ldflags=LINK_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
         extra_include_paths=include_dirs(),
         with_cuda=cuda, is_python_module=False, verbose=False)
