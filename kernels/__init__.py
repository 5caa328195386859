"""Triton kernels (installed as `ldm_rt.kernels`).

Public functions, each the fast twin of the plain-PyTorch reference of the same name in
`ldm_rt.ops`, and each a torch custom op (`torch.ops.ldm_rt.<name>`, with a fake
implementation) so it runs inside `torch.compile` and CUDA graphs as one opaque node:

- `layernorm_modulate(x, shift, scale, eps)`                      kernels/adaln.py
- `gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps)` kernels/adaln.py
- `apply_rope(x, cos, sin)`                                        kernels/rope.py
- `attention(q, k, v, key_padding_mask, cos, sin, scale)`          kernels/flash_attention.py
- `rms_norm(x, weight, eps)`                                       kernels/rmsnorm.py

Every input may have any strides (views, permutes, chunks of a fused projection are read in
place, never copied); a unit last-dim stride is what makes loads coalesced, so it is the fast
case. Dtypes fp32 / fp16 / bf16; statistics, softmax and rotations are computed in fp32.

Kernels run on CUDA tensors, and on CPU tensors in Triton's interpreter when the environment
has `TRITON_INTERPRET=1` before the first kernel is used (triton reads it when a kernel file is
imported); that is how CI checks them. Nothing here imports triton until a kernel runs; without
triton, the first call raises one sentence naming `pip install 'ldm-rt[triton]'`.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from ldm_rt.errors import InputError, require

__all__ = ["layernorm_modulate", "gated_residual_layernorm_modulate", "apply_rope", "attention", "rms_norm",
           "interpreting"]


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernel_module(name: str):
    """kernels/<name>.py, imported on first use (it imports triton)."""
    require("triton", "triton", "the ldm-rt Triton kernels")
    return importlib.import_module(f"{__name__}.{name}")


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise InputError(f"the Triton kernels run on CUDA tensors, got one on {t.device}; move it to CUDA, "
                         "or set TRITON_INTERPRET=1 before the first kernel call to run them in Triton's CPU interpreter.")


# ---------------------------------------------------------------------------------------------
# Custom ops: the real implementations launch the kernels; the fakes only describe outputs.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("ldm_rt::layernorm_modulate", mutates_args=())
def _layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    _check_device(x)
    return _kernel_module("adaln").layernorm_modulate(x, shift, scale, eps)


@_layernorm_modulate.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("ldm_rt::gated_residual_layernorm_modulate", mutates_args=())
def _gated_residual_layernorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    _check_device(x)
    return _kernel_module("adaln").gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps)


@_gated_residual_layernorm_modulate.register_fake
def _(x, y, gate, shift, scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("ldm_rt::apply_rope", mutates_args=())
def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _check_device(x)
    return _kernel_module("rope").apply_rope(x, cos, sin)


@_apply_rope.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.custom_op("ldm_rt::attention", mutates_args=())
def _attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, cos: Tensor | None, sin: Tensor | None,
    scale: float | None,
) -> Tensor:
    _check_device(q)
    return _kernel_module("flash_attention").attention(q, k, v, key_padding_mask, cos, sin, scale)


@_attention.register_fake
def _(q, k, v, key_padding_mask, cos, sin, scale):
    B, H, NQ, D = q.shape
    return q.new_empty((B, NQ, H, D)).transpose(1, 2)  # the kernel's layout: see flash_attention.py


@torch.library.custom_op("ldm_rt::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check_device(x)
    return _kernel_module("rmsnorm").rms_norm(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# Public functions: the references' signatures and defaults.
# ---------------------------------------------------------------------------------------------


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm(x, no affine) * (1 + scale) + shift; reference `ops.layernorm_modulate`.

    x (B, N, D) with any D up to 16384 and any strides; shift/scale (B, D), any strides (e.g.
    chunks of the adaLN projection). Returns a contiguous (B, N, D) tensor in x's dtype;
    statistics in fp32.
    """
    return torch.ops.ldm_rt.layernorm_modulate(x, shift, scale, float(eps))


def gated_residual_layernorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """(h, LayerNorm(h) * (1 + scale) + shift) with h = x + gate * y, in one pass over memory;
    reference `ops.gated_residual_layernorm_modulate`.

    x, y (B, N, D) and gate/shift/scale (B, D), any strides; gate None: h = x + y (an ungated
    residual, as the cross-attention's). Returns two contiguous (B, N, D)
    tensors in x's dtype; h is computed in fp32 and rounded once, and the norm is taken of the
    rounded h that is returned.
    """
    return torch.ops.ldm_rt.gated_residual_layernorm_modulate(x, y, gate, shift, scale, float(eps))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x (B, H, N, D) by cos/sin (N, D/2); reference `ops.apply_rope`.

    x and the tables may have any strides; cos/sin are fp32 or x's dtype, the rotation is in
    fp32. Returns a contiguous (B, H, N, D) tensor in x's dtype.
    """
    return torch.ops.ldm_rt.apply_rope(x, cos, sin)


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, cos: Tensor | None = None,
    sin: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale) v, flash-attention style; reference `ops.attention`.

    q (B, H, Nq, D), k/v (B, H, Nk, D), any strides, any Nq/Nk, head dim up to 256 (64, 72, 96,
    128 tested); key_padding_mask (B, Nk) bool, True = attend; cos/sin (Nq, D/2), fp32 or q's
    dtype: RoPE applied to q and k inside the kernel (self-attention, Nq = Nk). scale defaults
    to 1/sqrt(D). Online softmax with fp32 accumulation. Returns (B, H, Nq, D) in q's dtype, a
    transposed view of a contiguous (B, Nq, H, D) buffer, so `out.transpose(1, 2)` is
    contiguous. A query row whose keys are all masked returns zeros.
    """
    return torch.ops.ldm_rt.attention(q, k, v, key_padding_mask, cos, sin, None if scale is None else float(scale))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x * rsqrt(mean(x^2, last dim) + eps) * weight; reference `ops.rms_norm` (the qk-norm).

    x (B, H, N, D) or (B, N, D), any strides (a head view of a projection is read in place), D up
    to 16384; weight (D,). Returns a contiguous tensor of x's shape and dtype; statistics in fp32.
    """
    return torch.ops.ldm_rt.rms_norm(x, weight, float(eps))
