"""What the CUDA kernel tests share: whether they can run here, and how their errors are measured."""
import pytest
import torch

__all__ = ["cuda", "has_cuda_kernels", "worst"]


def has_cuda_kernels() -> bool:
    """A GPU is present and the loaded extension was built with CUDA kernels."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "tuneforge::flash_attention_forward", "CUDA")


#: marks a test that needs a GPU and a CUDA build of tuneforge's kernels (skipped elsewhere)
cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="no CUDA device or no CUDA build of tuneforge's kernels")


def worst(got, truth) -> float:
    """The largest absolute difference, in float64, of a result from its float64 truth."""
    return (got.double() - truth).abs().max().item()
