"""Build script. Metadata, dependencies and entry points live in pyproject.toml.

This file exists for the ahead-of-time build of the C++/CUDA extension ``tuneforge._C`` (sources under
``csrc/``). Until the kernels land there is nothing to compile and it is a plain ``setup()``.
"""
from setuptools import setup

setup()
