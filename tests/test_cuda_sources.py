"""The CUDA sources compile on any machine with the CUDA toolkit, GPU or not: the kernels with nvcc for Hopper
(sm_90), their torch bindings with the host compiler against torch's headers. (Whether they compute the right
thing is tests/test_kernels.py's CUDA part, which runs where a GPU is.)"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp

from tuneforge.kernels import build

NVCC = shutil.which("nvcc") or (os.path.join(cpp.CUDA_HOME, "bin", "nvcc") if cpp.CUDA_HOME else None)
pytestmark = pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="no CUDA toolkit (nvcc) here")


def _cuda_include() -> str:
    homes = [os.environ.get("CUDA_HOME"), cpp.CUDA_HOME, str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(Path(home) / "include")
    pytest.skip(f"nvcc at {NVCC}, but no CUDA headers (cuda_runtime.h) found under {homes}")


# NVVM's optimiser (cicc at -O3) is 97% of the compile: about 130 s of a 2-core machine's test run for what is a check
# that the sources compile. Without it the front end still parses the sources and instantiates every template, and
# ptxas still assembles them for sm_90, which is what can fail on a machine with no GPU. TUNEFORGE_NVCC_FULL=1
# compiles with the build's flags alone (setup.py's, as a CUDA machine's install does).
FAST = [] if os.environ.get("TUNEFORGE_NVCC_FULL") == "1" else ["-Xcicc", "-O0"]


def _run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    return done


def test_the_cuda_kernels_compile_with_nvcc(tmp_path):
    kernels = [s for s in build.sources(cuda=True) if s.endswith(".cu")]
    assert kernels, "no .cu file among the CUDA sources"
    for source in kernels:
        obj = tmp_path / (Path(source).stem + ".o")
        _run([NVCC, "-c", source, "-o", str(obj), *build.NVCC_FLAGS, *FAST, "-gencode", "arch=compute_90,code=sm_90",
              *(f"-I{d}" for d in build.include_dirs())])
        symbols = _run(["nm", "-C", str(obj)]).stdout if shutil.which("nm") else ""
        assert obj.stat().st_size > 0
        if symbols:  # the launchers the bindings call are defined
            for name in ("attention_forward", "attention_backward", "lora_shrink", "lora_expand", "segment_outer"):
                assert f"tuneforge::cuda::{name}(" in symbols


def test_the_cuda_bindings_compile_against_torch_headers(tmp_path):
    # A CPU build of torch ships c10/cuda's headers but not the one its CMake generates; a stand-in lets the
    # bindings be checked here (a CUDA build of torch has the real one).
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path / "stub"), *cpp.include_paths(), _cuda_include(), *build.include_dirs(),
                sysconfig.get_paths()["include"]]
    cxx = os.environ.get("CXX", "c++")
    for source in (s for s in build.sources(cuda=True) if s.endswith(".cpp") and "/cuda/" in s.replace(os.sep, "/")):
        _run([cxx, "-std=c++17", "-fsyntax-only", *(f"-I{d}" for d in includes), source])  # asserts rc 0
