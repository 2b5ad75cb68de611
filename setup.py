"""Build script. Metadata, dependencies and entry points live in pyproject.toml.

This file builds the C++/CUDA extension ``tuneforge._C`` ahead of time from the sources that
``core/kernels/build.py`` lists (the same description the JIT build uses). Build with
``pip install --no-build-isolation -e .`` so the extension is compiled against the torch already installed.
``TUNEFORGE_NO_EXTENSION=1`` skips it; tuneforge then compiles the kernels on first use, or runs the pure-torch
reference where it cannot.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup


def _extensions():
    if os.environ.get("TUNEFORGE_NO_EXTENSION", "").strip() in ("1", "true", "yes"):
        return {}, []
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch at build time: the kernels are JIT-compiled on first use instead
        return {}, []
    spec = importlib.util.spec_from_file_location("_tf_build", Path(__file__).parent / "core" / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    cuda = build.with_cuda()
    root = Path(__file__).parent
    srcs = [os.path.relpath(s, root) for s in build.sources(cuda=cuda)]
    if cuda:
        ext = CUDAExtension("tuneforge._C", srcs, include_dirs=build.include_dirs(),
                            extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
                            extra_link_args=build.LINK_FLAGS)
    else:
        ext = CppExtension("tuneforge._C", srcs, extra_compile_args={"cxx": build.CXX_FLAGS},
                           extra_link_args=build.LINK_FLAGS)
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}, [ext]


cmdclass, ext_modules = _extensions()
setup(cmdclass=cmdclass, ext_modules=ext_modules)
