"""Trained weights of a method (SeerAttention-R gates, DSA indexers): a directory with
``gates.safetensors`` (the tensors) and ``gates.json`` (method, shapes, how they were trained)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hetmem.errors import HetmemError

WEIGHTS = "gates.safetensors"
META = "gates.json"


def save_gates(out_dir, method: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HetmemError(f"--out {out_dir} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS))
    (out / META).write_text(json.dumps({"method": method, **meta}, indent=2))
    return out


def check_gates_dir(path) -> Path:
    """A --gates directory that holds trained weights, checked before any model loads."""
    p = Path(path)
    if not p.is_dir():
        raise HetmemError(f"--gates {path} is not a directory (expected one written by 'hetmem train')")
    if not (p / WEIGHTS).is_file() or not (p / META).is_file():
        raise HetmemError(f"--gates {path} holds no {WEIGHTS} and {META} (write one with 'hetmem train')")
    return p


def load_gates(path, method: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    p = check_gates_dir(path)
    try:
        meta = json.loads((p / META).read_text())
        tensors = load_file(str(p / WEIGHTS))
    except Exception as exc:  # corrupt file
        raise HetmemError(f"cannot read gates in {path}: {exc}") from None
    if meta.get("method") != method:
        raise HetmemError(f"--gates {path} were trained for method '{meta.get('method')}', not '{method}'")
    return tensors, meta


def check_shape(t: torch.Tensor, shape: tuple, what: str, path) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise HetmemError(f"--gates {path}: {what} has shape {tuple(t.shape)}, this model needs {tuple(shape)} "
                          "(were they trained for another model?)")
    return t
