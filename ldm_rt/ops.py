"""The swap point: attention, RoPE, the adaLN modulate step and the RMS qk-norm.

The reference models call these functions through this module (`ops.attention(...)`), never
inline, so a faster backend routes them to kernels by replacing the implementation here
(`ops.use(...)`) instead of forking a model file. Each function below is the plain-PyTorch
reference that a kernel in `ldm_rt.kernels` must match.

Precision: statistics (LayerNorm/RMSNorm) and softmax are computed in fp32 whatever the input
dtype, because fp16 overflows in `x**2` sums and in `exp` for large logits; results are cast
back to the input dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift/scale (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(
    x: torch.Tensor,
    eps: float = 1e-6,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim (affine when weight/bias are given); statistics in fp32."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(x.dtype)


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm(x, no affine) * (1 + scale) + shift; the adaLN step of a DiT block."""
    return modulate(layer_norm(x, eps), shift, scale)


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual add of one sub-block and the adaLN step of the next, as one op.

    x, y (B, N, D), gate/shift/scale (B, D); gate None is an ungated residual (the
    cross-attention's). Returns (h, layernorm_modulate(h, shift, scale)) with h = x + gate * y.
    The reference of `ldm_rt.kernels.gated_residual_layernorm_modulate`.
    """
    h = x + y if gate is None else x + gate[:, None, :] * y  # (B, N, D)
    return h, layernorm_modulate(h, shift, scale, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with a learned scale; statistics in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope_freqs(
    height: int,
    width: int,
    axes_dim: tuple[int, int],
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D axial RoPE tables for a height x width token grid (row-major token order).

    The head dim is split between rows (first `axes_dim[0]` channels) and columns (the rest);
    each axis uses the 1D frequencies theta ** (-2i / axis_dim), as Flux's `FluxPosEmbed`.
    Returns cos, sin of shape (N, head_dim // 2) in fp32: one angle per interleaved pair.
    """
    # expand/reshape rather than repeat/repeat_interleave: the same values, but torch 2.13's ONNX
    # exporter keeps these ops symbolic in height/width, so one dynamic export serves every size
    # (with repeat_interleave the exported table only fit the traced size).
    rows = torch.arange(height, device=device, dtype=torch.float64)[:, None].expand(height, width).reshape(-1)  # (N,)
    cols = torch.arange(width, device=device, dtype=torch.float64)[None, :].expand(height, width).reshape(-1)  # (N,)
    angles = []
    for pos, dim in zip((rows, cols), axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)  # (dim/2,)
        angles.append(pos[:, None] * freqs[None, :])  # (N, dim/2)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim/2)
    return angle.cos().float(), angle.sin().float()


def rope_freqs_from_ids(
    ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables from explicit position ids (N, n_axes), one axis per `axes_dim` entry (Flux).

    Axis a rotates its `axes_dim[a]` channels of the head dim by ids[:, a] * theta ** (-2i / dim),
    as diffusers' `FluxPosEmbed` (angles in fp64, as it does on CPU/CUDA). Flux uses 3 axes
    (0, row, col) for image tokens and all-zero ids for text tokens (no rotation).
    Returns cos, sin of shape (N, sum(axes_dim) // 2) in fp32, the layout `apply_rope` takes.
    """
    pos = ids.float()  # (N, n_axes), as diffusers rounds ids through fp32
    angles = []
    for a, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=ids.device, dtype=torch.float64) / dim)  # (dim/2,)
        angles.append(torch.outer(pos[:, a].double(), freqs))  # (N, dim/2)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim/2)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, H, N, D) by the angles in cos/sin (N, D/2), in fp32.

    out[2i] = x[2i] cos_i - x[2i+1] sin_i;  out[2i+1] = x[2i] sin_i + x[2i+1] cos_i
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, N, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.float(), sin.float()
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D).

    key_padding_mask (B, Nk) bool, True = attend; every row must attend to at least one key.
    When cos/sin are given, RoPE (`apply_rope`) is applied to q and k first (self-attention).
    Softmax in fp32: scores are computed from fp32 copies of q and k.
    """
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `attention`, through PyTorch's fused SDPA (fp32 softmax inside).

    The torch backend's default: it never materialises the (Nq, Nk) score matrix in memory.
    `tests/test_ops.py` holds it to `attention`.
    """
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Dispatch: models call the names below; backends swap what they point to.
# ---------------------------------------------------------------------------------------------

_REFERENCE: dict[str, Callable] = {
    "attention": sdpa_attention,
    "apply_rope": apply_rope,
    "layernorm_modulate": layernorm_modulate,
    "gated_residual_layernorm_modulate": gated_residual_layernorm_modulate,
    "rms_norm": rms_norm,
}
_active: dict[str, Callable] = dict(_REFERENCE)


def impl(name: str) -> Callable:
    """The implementation currently routed for `name`."""
    return _active[name]


@contextlib.contextmanager
def use(**impls: Callable) -> Iterator[None]:
    """Route swap-point calls to other implementations inside the block.

    Example: `with ops.use(attention=kernels.attention): model(x)`.
    """
    unknown = set(impls) - set(_REFERENCE)
    if unknown:
        raise KeyError(f"not a swap point: {sorted(unknown)}; swap points are {sorted(_REFERENCE)}")
    saved = dict(_active)
    _active.update(impls)
    try:
        yield
    finally:
        _active.clear()
        _active.update(saved)
