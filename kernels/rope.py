"""RoPE on interleaved pairs: out[2i] = x[2i] cos_i - x[2i+1] sin_i, out[2i+1] = x[2i] sin_i + x[2i+1] cos_i.

Reference: `ldm_rt.ops.apply_rope`. Public entry point (custom op, fake, docs):
`ldm_rt.kernels.apply_rope`.

Design: a flat elementwise kernel over the N * D/2 pairs of one (batch, head), BLOCK pairs per
program, each pair loaded as a (BLOCK, 2) tile and split in registers. Flattening over pairs
instead of tiling (N, D) means no lane is wasted on padding when D/2 is not a power of two
(D = 72: 36 pairs per row; a (rows, next_pow2(36)) tile would leave 44% of lanes masked).
The rotation is computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # pairs per program (2048 elements); not measured on a GPU yet


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    H, N, HALF,
    sxb, sxh, sxn, sxd, scn, scd, ssn, ssd,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    p = pid * BLOCK + tl.arange(0, BLOCK)  # pair index in [0, N * HALF)
    ok = p < N * HALF
    n = (p // HALF).to(tl.int64)
    i = p % HALF
    two = tl.arange(0, 2)
    x_offs = b * sxb + h * sxh + n * sxn + (2 * i) * sxd  # (BLOCK,) offset of x[2i]
    x = tl.load(x_ptr + x_offs[:, None] + two[None, :] * sxd, mask=ok[:, None], other=0.0).to(tl.float32)
    x0, x1 = tl.split(x)  # (BLOCK,), (BLOCK,)
    c = tl.load(cos_ptr + n * scn + i * scd, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + n * ssn + i * ssd, mask=ok, other=0.0).to(tl.float32)
    out = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)  # (BLOCK, 2)
    # Output is contiguous (B, H, N, D): pair p of this (b, h) starts at element 2p.
    out_offs = bh * N * HALF * 2 + 2 * p.to(tl.int64)
    tl.store(out_ptr + out_offs[:, None] + two[None, :], out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Launcher: x (B, H, N, D) any strides; cos/sin (N, D/2) any strides -> contiguous (B, H, N, D)."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be (B, H, N, D) with an even D, got shape {tuple(x.shape)}.")
    B, H, N, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (N, D // 2):
            raise ValueError(f"{name} must be (N, D/2) = ({N}, {D // 2}), got {tuple(t.shape)}.")
        if t.device != x.device or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor on {x.device}, got {t.dtype} on {t.device}.")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(N * D // 2, BLOCK), B * H)
    _rope_kernel[grid](x, cos, sin, out, H, N, D // 2, *x.stride(), *cos.stride(), *sin.stride(),
                       BLOCK=BLOCK, num_warps=4)
    return out
