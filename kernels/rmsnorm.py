"""RMSNorm with a learned scale over the last dim: x * rsqrt(mean(x^2) + eps) * weight (qk-norm).

Reference: `ldm_rt.ops.rms_norm`. Public entry point (custom op, fake, docs):
`ldm_rt.kernels.rms_norm`. The file is not called `rms_norm.py` because importing a submodule
binds its name on the package, which would shadow the public function (as flash_attention.py).

Design: the qk-norm of the DiT and of FLUX.1 normalises each head's q and k vector (rows of the
head dim, 72 or 128 wide) read straight from the projection's (B, N, H, Dh) layout through its
(B, H, N, Dh) transposed view. A program takes BLOCK_R whole rows (a tile of ~4096 elements),
flattened over (batch, head, token), so a narrow row does not get a program to itself; each row
is read once and written once (the reference's eager ops make ~6 passes: cast, square, mean,
rsqrt, two products). Statistics in fp32, one rounding at the end. Not measured on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_D = 16384  # a row is held in registers, as the adaLN kernel's (kernels/adaln.py)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,
    R, H, N, D, eps,
    sxb, sxh, sxn, sxd, swd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # flat (batch, head, token) index
    row_ok = rows < R
    b = rows // (H * N)
    h = (rows // N) % H
    n = rows % N
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    offs = (b * sxb + h * sxh + n * sxn)[:, None] + cols[None, :] * sxd
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # masked columns are zero
    w = tl.load(w_ptr + cols * swd, mask=col_ok, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * w[None, :]
    # Output is contiguous in x's logical shape: row r starts at element r * D.
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


def _config(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): a tile of ~4096 elements (32 rows of head dim 128)."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 4096 // block_d))
    num_warps = max(1, min(8, block_r * block_d // 512))
    return block_r, block_d, num_warps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launcher: x (B, H, N, D) or (B, N, D), any strides; weight (D,) -> contiguous, x's shape and dtype."""
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, H, N, D) or (B, N, D), got shape {tuple(x.shape)}.")
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(f"rms_norm holds a row in registers, up to D = {MAX_D}; got D = {D}.")
    if weight.shape != (D,) or weight.device != x.device or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point ({D},) tensor on {x.device}, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}.")
    x4 = x if x.dim() == 4 else x.unsqueeze(1)  # (B, 1, N, D): a view
    B, H, N, _ = x4.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = B * H * N
    if rows * D == 0:
        return out
    block_r, block_d, num_warps = _config(D)
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        x4, weight, out, rows, H, N, D, float(eps), *x4.stride(), weight.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
