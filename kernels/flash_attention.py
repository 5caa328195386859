"""Flash attention (forward): softmax(q k^T * scale) v with an online softmax, fp32 accumulation,
an optional key padding mask and optional RoPE applied to q and k inside the kernel.

Reference: `ldm_rt.ops.attention` (with cos/sin: `apply_rope` on q and k, then attention).
Public entry point (custom op, fake, docs): `ldm_rt.kernels.attention`. The file is not called
`attention.py` because importing a submodule binds its name on the package, which would shadow
the public function `ldm_rt.kernels.attention`.

Design:
- One program per (BLOCK_M queries, batch * head); it streams BLOCK_N keys at a time, keeping
  the running max m, the running sum l and the output accumulator in fp32 registers; scores
  use exp2 with log2(e) folded into the scale. Keys past Nk and padded keys score -inf; the
  running max starts at -1e30 (finite), so a block with no valid key adds exactly nothing
  instead of NaN. A query row with no valid key at all returns zeros (the reference: NaN).
- Head dim as two power-of-two chunks, not one padded block: D = 64 + 16 for DiT-XL's 72
  (the last 8 of 16 masked), 64 + 32 for 96, one block for 64 and 128. `tl.dot` needs
  power-of-two tiles with K >= 16, so padding 72 to 128 would spend 44% of every q k^T and
  p v matmul on zeros; the split spends 10% (80 / 72). `head_dim_blocks` returns the split;
  the launcher's `pad_head_dim=True` forces the single padded block so bench/kernel_bench.py can
  measure both. Not measured on a GPU yet.
- Fused RoPE: a q or k tile is loaded, viewed as (rows, pairs, 2), split into the pairs' even
  and odd elements and rotated in fp32 by (rows, pairs) cos/sin tiles, then joined back. An
  earlier version loaded each tile a second time with the pair elements swapped (offset d ^ 1)
  and cos/sin at full head width: on sm_90a the software pipeliner staged all four loads in
  shared memory, 256 KiB at D = 128 (above the H100's 227 KiB: it could not launch) and 108 KiB
  with register spills at D = 72; this one needs 192 and 118 KiB, without spills
  (bench/compile_kernels.py, with the alignment of `aligned_elements`). The rotated tile is
  rounded to the input dtype before the matmul, as the reference rounds `apply_rope`'s output;
  no rotated copy is written to memory. k is rotated once per query block that reads it
  (Nq / BLOCK_M times): elementwise work next to a BLOCK_M x BLOCK_N x D matmul, the issue's
  budget is < 10% over no RoPE (to be measured).
- fp32 inputs use IEEE fp32 dots (not TF32) so they meet the fp32 op tolerance; fp16/bf16 use
  tensor cores with fp32 accumulation; probabilities are rounded to v's dtype for p @ v, as in
  FlashAttention.
- The output is allocated as a (B, Nq, H, D) buffer and returned as its (B, H, Nq, D)
  transposed view, so a model's `out.transpose(1, 2).flatten(2)` is a view, not a copy.
- Block sizes (BLOCK_M, BLOCK_N, warps, stages) come from `_config`: the Triton fused-attention
  tutorial's defaults for Hopper/Ampere in fp16/bf16, not tuned on a GPU; checked for spills and
  shared memory on sm_90a by `bench/compile_kernels.py`, which runs the real compiler without
  a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(base, row_offs, row_ok, cols, col_stride, col_ok):
    """(len(row_offs), len(cols)) tile at base + row_offs + cols * col_stride, zeros where masked."""
    ptrs = base + row_offs[:, None] + cols[None, :] * col_stride
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _load_rotated(base, row_offs, row_ok, cols, col_stride, col_ok,
                  cos_ptr, sin_ptr, cos_rows, sin_rows, scd, ssd,
                  COL0: tl.constexpr, WIDTH: tl.constexpr, HALF_DIM: tl.constexpr, ROPE: tl.constexpr):
    """A q or k tile of head-dim columns COL0 .. COL0 + WIDTH (`cols`); with ROPE, rotated by
    the angles of its rows (positions; `cos_rows` / `sin_rows` are the rows' offsets in the
    tables) in fp32, pair by pair: the tile is viewed as (rows, WIDTH / 2, 2), split into its
    even and odd halves, rotated by (rows, WIDTH / 2) cos/sin tiles and joined back."""
    x = _load_tile(base, row_offs, row_ok, cols, col_stride, col_ok)
    if ROPE:
        pairs = COL0 // 2 + tl.arange(0, WIDTH // 2)
        pair_ok = pairs < HALF_DIM
        c = _load_tile(cos_ptr, cos_rows, row_ok, pairs, scd, pair_ok).to(tl.float32)
        s = _load_tile(sin_ptr, sin_rows, row_ok, pairs, ssd, pair_ok).to(tl.float32)
        even, odd = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], WIDTH // 2, 2)))  # x[2i], x[2i + 1]
        rotated = tl.join(even * c - odd * s, even * s + odd * c)  # (rows, WIDTH / 2, 2)
        x = tl.reshape(rotated, (x.shape[0], WIDTH)).to(x.dtype)
    return x


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cos_ptr, sin_ptr, out_ptr,
    H, NQ, NK, qk_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smn, scn, scd, ssn, ssd, sob, soh, son, sod,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr, TABLE_ALIGN: tl.constexpr,
):
    # The batch, head and row strides of q, k, v and out arrive divided by ALIGN, those of the
    # RoPE tables by TABLE_ALIGN (see `aligned_elements`). Each offset is multiplied back by the
    # constant, which tells the compiler that every row starts on a 16-byte boundary, so rows
    # load and store as 16-byte vectors (tl.multiple_of on an argument did not reach the loads).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    q_base = q_ptr + (b * sqb + h * sqh) * ALIGN
    k_base = k_ptr + (b * skb + h * skh) * ALIGN
    v_base = v_ptr + (b * svb + h * svh) * ALIGN

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NQ
    q_rows = offs_m * sqn * ALIGN
    qc_rows, qs_rows = offs_m * scn * TABLE_ALIGN, offs_m * ssn * TABLE_ALIGN  # q's rows in the RoPE tables
    d0 = tl.arange(0, BLOCK_D0)
    d0_ok = d0 < HEAD_DIM
    q0 = _load_rotated(q_base, q_rows, m_ok, d0, sqd, d0_ok, cos_ptr, sin_ptr, qc_rows, qs_rows, scd, ssd,
                       0, BLOCK_D0, HEAD_DIM // 2, ROPE)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:  # second head-dim chunk (e.g. channels 64..71 of 72, in a 16-wide block)
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d1_ok = d1 < HEAD_DIM
        q1 = _load_rotated(q_base, q_rows, m_ok, d1, sqd, d1_ok, cos_ptr, sin_ptr, qc_rows, qs_rows, scd, ssd,
                           BLOCK_D0, BLOCK_D1, HEAD_DIM // 2, ROPE)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 domain), finite: see docstring
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2

    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        k_rows, v_rows = offs_n * skn * ALIGN, offs_n * svn * ALIGN
        kc_rows, ks_rows = offs_n * scn * TABLE_ALIGN, offs_n * ssn * TABLE_ALIGN
        k0 = _load_rotated(k_base, k_rows, n_ok, d0, skd, d0_ok, cos_ptr, sin_ptr, kc_rows, ks_rows, scd, ssd,
                           0, BLOCK_D0, HEAD_DIM // 2, ROPE)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        if BLOCK_D1 > 0:
            k1 = _load_rotated(k_base, k_rows, n_ok, d1, skd, d1_ok, cos_ptr, sin_ptr, kc_rows, ks_rows, scd, ssd,
                               BLOCK_D0, BLOCK_D1, HEAD_DIM // 2, ROPE)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        valid = n_ok
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * smb + offs_n * smn, mask=n_ok, other=0)
            valid = valid & (keep != 0)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0 = _load_tile(v_base, v_rows, n_ok, d0, svd, d0_ok)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            v1 = _load_tile(v_base, v_rows, n_ok, d1, svd, d1_ok)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=DOT_PRECISION)
        m_i = m_new

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # a row with no valid key: acc = 0 -> zeros
    o_base = out_ptr + (b * sob + h * soh) * ALIGN
    o_rows = offs_m[:, None] * son * ALIGN
    tl.store(o_base + o_rows + d0[None, :] * sod, (acc0 * inv_l[:, None]).to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d0_ok[None, :])
    if BLOCK_D1 > 0:
        tl.store(o_base + o_rows + d1[None, :] * sod, (acc1 * inv_l[:, None]).to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d1_ok[None, :])


def head_dim_blocks(head_dim: int, pad: bool = False) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the largest power of two <= D, then the rest rounded up to a power
    of two (0 when nothing is left); both >= 16 (tl.dot's minimum). 72 -> (64, 16), 96 -> (64,
    32), 64 -> (64, 0), 128 -> (128, 0). With pad=True: (next_pow2(D), 0)."""
    if pad:
        return max(16, triton.next_power_of_2(head_dim)), 0
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _config(head_dim: int, dtype: torch.dtype, nq: int, rope: bool) -> dict:
    """Block sizes and launch options. fp16/bf16: the Triton fused-attention tutorial's
    defaults for Hopper/Ampere (not tuned on a GPU yet). Register and shared-memory figures are
    ptxas's for sm_90a, from `python bench/compile_kernels.py --grid` (no GPU needed):
    - fp16/bf16, 128 x 64 tiles, 8 warps past head dim 64: no spills at head dims 64, 72, 96 and
      128; D = 72 needs 80 KiB of shared memory, 118 with fused RoPE; D = 128 with fused RoPE
      192 KiB (of 227).
    - Short query sets (Nq <= 64: a 16-64 row tile) take 4 warps and 32 keys per block: with 64
      keys, D = 72 spilled 4-32 B at 2, 4 and 8 warps; with 32, no head dim spills.
    - fp32 (IEEE dots on CUDA cores, no tensor cores; for parity more than speed): 64 x 32 tiles
      with 8 warps spill at most 32 B per thread at D <= 128 without RoPE (the tutorial's 4
      warps spilled up to 16 KiB at D = 128); 16-row tiles (Nq <= 16) take 4 warps. Fused RoPE
      in fp32 takes 16 x 16 tiles: no spills for head dims split into blocks of <= 64, up to
      316 B per thread where a block is 128 wide (D = 128, or a padded 72 / 96)."""
    if dtype == torch.float32:
        (block_m, block_n), num_stages = ((16, 16) if rope else (64, 32)), 2
    else:
        block_m, block_n, num_stages = 128, 64, 3
    block_m = min(block_m, max(16, triton.next_power_of_2(nq)))  # short query sets (e.g. Nq = 1)
    if dtype == torch.float32:
        num_warps = 8 if block_m == 64 else 4
    elif block_m <= 64:
        block_n, num_warps = 32, 4
    else:
        num_warps = 8 if head_dim > 64 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def aligned_elements(*tensors: torch.Tensor) -> int:
    """The kernel's ALIGN: the largest power of two p, with p elements at most 16 bytes, such that
    every tensor's data pointer and every stride but the last are multiples of p elements. Then
    each row of the last dimension starts on a p-element boundary. The launcher passes those
    strides divided by p and the kernel multiplies each offset back by the constant p, which is
    how the compiler learns it.

    Triton's JIT only learns that an integer argument is divisible by 16. DiT-XL's q, k and v
    are views of one qkv projection with a head stride of 72 elements, so nothing told the
    compiler that a head's rows start 16-byte aligned: every q/k/v load was 2 bytes wide and
    none was an asynchronous copy (ld.global.b16 in the sm_90a PTX). With ALIGN = 8 they are
    16-byte loads and cp.async copies, and the fused-RoPE launch went from 255 registers to 185
    (bench/compile_kernels.py; speed not measured yet)."""
    p = 16 // max(t.element_size() for t in tensors)
    while p > 1 and any(t.data_ptr() % (p * t.element_size()) or any(st % p for st in t.stride()[:-1])
                        for t in tensors):
        p //= 2
    return p


def attention(q, k, v, key_padding_mask=None, cos=None, sin=None, scale=None, pad_head_dim: bool = False):
    """Launcher. q (B, H, Nq, D), k/v (B, H, Nk, D), each with any strides; key_padding_mask
    (B, Nk) bool, any strides; cos/sin (Nq, D/2), any strides, fp32 or q's dtype (needs Nq = Nk).
    Returns a (B, H, Nq, D) tensor in q's dtype, the transposed view of a contiguous
    (B, Nq, H, D) buffer."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if k.shape != (B, H, NK, D) or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, H, Nk, D) = ({B}, {H}, Nk, {D}), got {tuple(k.shape)}, {tuple(v.shape)}.")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if D > 256:
        raise ValueError(f"head dim {D} is above the kernel's 256.")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, NK) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (B, Nk) = ({B}, {NK}), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}.")
    rope = cos is not None or sin is not None
    if rope:
        if cos is None or sin is None:
            raise ValueError("give both cos and sin for fused RoPE, or neither.")
        if NQ != NK or D % 2:
            raise ValueError(f"fused RoPE needs self-attention (Nq = Nk) and an even head dim; got Nq={NQ}, Nk={NK}, D={D}.")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (NQ, D // 2) or not t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a float (N, D/2) = ({NQ}, {D // 2}) table, got {t.dtype} {tuple(t.shape)}.")
    for name, t in (("k", k), ("v", v), ("key_padding_mask", key_padding_mask), ("cos", cos), ("sin", sin)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}.")

    out = torch.empty((B, NQ, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Nq, D) view
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d0, block_d1 = head_dim_blocks(D, pad_head_dim)
    cfg = _config(D, q.dtype, NQ, rope)
    # bool -> uint8 view (same bytes, no copy): a byte load is explicit in the kernel.
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    cos_, sin_ = (cos, sin) if rope else (q, q)
    align = aligned_elements(q, k, v, out)
    table_align = aligned_elements(cos, sin) if rope else 1

    def strides(t, p):  # batch/head/row strides in units of p elements (the kernel multiplies back), then d's
        return *(st // p for st in t.stride()[:-1]), t.stride(-1)

    table_strides = (*strides(cos, table_align), *strides(sin, table_align)) if rope else (0, 0, 0, 0)
    grid = (triton.cdiv(NQ, cfg["BLOCK_M"]), B * H)
    _attention_kernel[grid](
        q, k, v, mask, cos_, sin_, out,
        H, NQ, NK, scale * LOG2E,
        *strides(q, align), *strides(k, align), *strides(v, align),
        *mask_strides, *table_strides, *strides(out, align),
        HEAD_DIM=D, BLOCK_D0=block_d0, BLOCK_D1=block_d1,
        HAS_MASK=key_padding_mask is not None, ROPE=rope,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ALIGN=align, TABLE_ALIGN=table_align,
        **cfg,
    )
    return out
