"""LaCT's fast-weight SwiGLU memory: f_W(x) = W2 (silu(W1 x) * (W3 x)), with W1 = U1 V1 and W3 = U3 V3
low rank and W2 full, per head. One chunk of (k, v) pairs updates W by a single gradient step on the loss
-sum_t f_W(k_t)^T v_t (Zhang et al., 2025, "Test-Time Training Done Right", arXiv 2505.23884).

Shapes (``H`` heads, ``d`` head dim, ``m`` fast-weight hidden dim, ``r`` rank, ``T`` chunk tokens):
U1, U3 ``[H, m, r]``; V1, V3 ``[H, r, d]``; W2 ``[H, d, m]``; k, v, q ``[H, T, d]``. The gradient is
written out by hand (checked against autograd in the tests), so the update is the same few batched
matmuls whether or not autograd is on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NAMES = ("U1", "V1", "W2", "U3", "V3")


def init_fast_weights(H: int, d: int, m: int, r: int, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def w(*shape, fan_in):
        return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(dtype).to(device)

    return {"U1": w(H, m, r, fan_in=r), "V1": w(H, r, d, fan_in=d), "W2": w(H, d, m, fan_in=m),
            "U3": w(H, m, r, fan_in=r), "V3": w(H, r, d, fan_in=d)}


def fw_forward(W: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """f_W(x) ``[H, T, d]`` and the intermediates the gradient needs."""
    h1 = torch.matmul(x, W["V1"].transpose(-1, -2))  # [H,T,r]
    a = torch.matmul(h1, W["U1"].transpose(-1, -2))  # [H,T,m]
    h3 = torch.matmul(x, W["V3"].transpose(-1, -2))
    b = torch.matmul(h3, W["U3"].transpose(-1, -2))
    g = F.silu(a) * b
    y = torch.matmul(g, W["W2"].transpose(-1, -2))  # [H,T,d]
    return y, {"x": x, "h1": h1, "a": a, "h3": h3, "b": b, "g": g}


def fw_apply(W: dict, q: torch.Tensor) -> torch.Tensor:
    return fw_forward(W, q)[0]


def fw_loss(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per head: -mean_t f_W(k_t)^T v_t ``[H]`` (the mean keeps the step size independent of the chunk length)."""
    return -(y * v).sum(-1).mean(-1)


def fw_grads(W: dict, inter: dict, v: torch.Tensor) -> dict:
    """Gradients of ``fw_loss`` (summed over heads) w.r.t. U1, V1, W2, U3, V3, by hand."""
    T = v.shape[-2]
    dy = -v / T  # [H,T,d]
    a, b, g = inter["a"], inter["b"], inter["g"]
    dW2 = torch.matmul(dy.transpose(-1, -2), g)  # [H,d,m]
    dg = torch.matmul(dy, W["W2"])  # [H,T,m]
    sig = torch.sigmoid(a)
    da = dg * b * sig * (1 + a * (1 - sig))
    db = dg * (a * sig)
    dU1 = torch.matmul(da.transpose(-1, -2), inter["h1"])  # [H,m,r]
    dV1 = torch.matmul(torch.matmul(da, W["U1"]).transpose(-1, -2), inter["x"])  # [H,r,d]
    dU3 = torch.matmul(db.transpose(-1, -2), inter["h3"])
    dV3 = torch.matmul(torch.matmul(db, W["U3"]).transpose(-1, -2), inter["x"])
    return {"U1": dU1, "V1": dV1, "W2": dW2, "U3": dU3, "V3": dV3}


def fw_step(W: dict, grads: dict, lr: float) -> dict:
    """One gradient step, in place: W <- W - lr * grad."""
    for n in NAMES:
        W[n].sub_(grads[n], alpha=lr)
    return W
