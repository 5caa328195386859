"""adaLN: LayerNorm (no affine) * (1 + scale) + shift, optionally fused with the gated residual
add that precedes it (h = x + gate * y). One kernel serves both ops (`GATED` is a compile-time
flag), so they share this file.

References: `ldm_rt.ops.layernorm_modulate` and `ldm_rt.ops.gated_residual_layernorm_modulate`.
Public entry points (custom ops, fakes, docs): `ldm_rt.kernels.layernorm_modulate` and
`ldm_rt.kernels.gated_residual_layernorm_modulate`.

Design: fully fused single pass. A program holds BLOCK_N whole rows in registers (BLOCK_D =
next power of two >= D, the tail masked), so x is read from memory once and the output written
once: the minimum traffic for a memory-bound op. Statistics are two-pass *over registers*
(mean, then mean of squared deviations), in fp32. The alternative, a loop over D chunks, must
read each row two or three times (statistics, then normalise); it is only needed beyond what
registers hold, so rows are capped at MAX_D = 16384 (64 KiB of fp32 per row, the bound the
Triton layer-norm tutorial uses). That covers every DiT/Flux width (1152 ... 3072) and the 8192
the issue asks for. BLOCK_N (rows per program) makes a tile of ~4096 elements, so small widths
do not launch one tiny program per row, and the shift/scale vectors are loaded once per tile.
num_warps grows with the tile (4096 elements -> 8 warps, 16 fp32 values per thread).
None of these choices has been measured on a GPU yet (bench/kernel_bench.py adaln).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_D = 16384


@triton.jit
def _adaln_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, h_ptr, out_ptr,
    N, D, eps,
    sxb, sxn, sxd, syb, syn, syd,
    sgb, sgd, shb, shd, scb, scd,
    GATED: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < N
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + b * sxb + rows64[:, None] * sxn + cols[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    # Outputs are contiguous (B, N, D).
    out_offs = (b * N + rows64[:, None]) * D + cols[None, :]
    if GATED:
        y = tl.load(y_ptr + b * syb + rows64[:, None] * syn + cols[None, :] * syd, mask=ok, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate = tl.load(gate_ptr + b * sgb + cols * sgd, mask=col_ok, other=0.0).to(tl.float32)
            y = gate[None, :] * y
        h = (x + y).to(h_ptr.dtype.element_ty)  # one rounding, in fp32 before it
        tl.store(h_ptr + out_offs, h, mask=ok)
        x = h.to(tl.float32)  # normalise the h that is returned, as rounded

    # Statistics in fp32 (fp16 overflows in sums of squares); masked tail columns are zero.
    mean = tl.sum(x, axis=1) / D  # (BLOCK_N,)
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(shift_ptr + b * shb + cols * shd, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * scb + cols * scd, mask=col_ok, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, vectors: dict[str, torch.Tensor], y: torch.Tensor | None = None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}.")
    B, _, D = x.shape
    if D > MAX_D:
        raise ValueError(f"layernorm_modulate kernels hold a row in registers, up to D = {MAX_D}; got D = {D}.")
    if y is not None and y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}.")
    for name, v in vectors.items():
        if v.shape != (B, D):
            raise ValueError(f"{name} must be (B, D) = ({B}, {D}), got {tuple(v.shape)}.")
    for name, t in dict(x=x, y=y, **vectors).items():
        if t is not None and (t.device != x.device or not t.dtype.is_floating_point):
            raise ValueError(f"{name} must be a floating-point tensor on {x.device}, got {t.dtype} on {t.device}.")


def _config(D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for rows of width D: a tile of ~4096 elements."""
    block_d = triton.next_power_of_2(D)
    block_n = max(1, min(16, 4096 // block_d))
    num_warps = max(1, min(16, block_n * block_d // 512))
    return block_n, block_d, num_warps


def _launch(x, y, gate, shift, scale, eps, h, out) -> None:
    B, N, D = x.shape
    if B * N == 0:
        return
    block_n, block_d, num_warps = _config(D)
    grid = (triton.cdiv(N, block_n), B)
    y_ = x if y is None else y  # unused pointers when not GATED
    gate_ = shift if gate is None else gate
    _adaln_kernel[grid](
        x, y_, gate_, shift, scale, out if h is None else h, out,
        N, D, eps,
        *x.stride(), *y_.stride(),
        *gate_.stride(), *shift.stride(), *scale.stride(),
        GATED=y is not None, HAS_GATE=gate is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launcher: x (B, N, D) any strides; shift/scale (B, D) any strides -> contiguous (B, N, D) in x's dtype."""
    _check(x, dict(shift=shift, scale=scale))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, None, shift, scale, eps, None, out)
    return out


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: x, y (B, N, D), gate (B, D) or None (h = x + y), shift/scale (B, D), any strides
    -> (h, out), contiguous, x's dtype."""
    vectors = dict(shift=shift, scale=scale) | ({} if gate is None else dict(gate=gate))
    _check(x, vectors, y)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, y, gate, shift, scale, eps, h, out)
    return h, out
