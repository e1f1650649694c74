"""Torch dtypes and devices as the command line names them, and the one device barrier timing needs."""

from __future__ import annotations

import torch

from hetmem.errors import HetmemError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str, device: str) -> torch.dtype:
    """A --dtype option as a torch dtype (``auto``: float32 on CPU, bfloat16 on CUDA)."""
    if dtype == "auto":
        # On CPU, fp32 matmuls run ~5x faster than bf16 in prefill (bf16 only wins in memory-bound decode).
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise HetmemError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sync(device) -> None:
    """Wait for queued kernels on a CUDA device (a no-op on CPU), so a timer charges them where they ran."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
