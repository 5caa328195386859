"""The one tolerance table, used by the tests, `ldm-rt parity` and the benchmarks.

Errors are relative L2 (||out - ref|| / ||ref||) and max-abs against the fp32 torch reference
on fresh seeded random inputs. End to end, the decoded image is compared by PSNR. NaN or Inf
never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float
    max_abs: float


# (component, dtype) -> tolerance against the fp32 reference.
# fp32 rows bound reordering differences between implementations (fused kernels, SDPA vs
# einsum, ONNX graphs); fp16/bf16 rows bound the rounding of 10/7 mantissa bits through a
# whole component (bf16 is ~8x coarser than fp16).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("text_encoder", "fp32"): Tolerance(1e-5, 1e-4),
    ("text_encoder", "fp16"): Tolerance(5e-3, 5e-2),
    ("text_encoder", "bf16"): Tolerance(3e-2, 2e-1),
    ("transformer", "fp32"): Tolerance(1e-5, 1e-4),
    ("transformer", "fp16"): Tolerance(5e-3, 5e-2),
    ("transformer", "bf16"): Tolerance(3e-2, 2e-1),
    ("vae", "fp32"): Tolerance(1e-5, 1e-4),
    ("vae", "fp16"): Tolerance(5e-3, 5e-2),
    ("vae", "bf16"): Tolerance(3e-2, 2e-1),
    # single ops (kernels against ops.py references)
    ("op", "fp32"): Tolerance(1e-5, 1e-4),
    ("op", "fp16"): Tolerance(2e-3, 1e-2),
    ("op", "bf16"): Tolerance(1.6e-2, 8e-2),
}
# Minimum PSNR (dB) of the final 8-bit image against the fp32 torch reference image.
IMAGE_PSNR_DB: dict[str, float] = {"fp32": 40.0, "fp16": 30.0, "bf16": 25.0}


@dataclass(frozen=True)
class Comparison:
    rel_l2: float
    max_abs: float
    finite: bool
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return self.finite and self.rel_l2 <= self.tolerance.rel_l2 and self.max_abs <= self.tolerance.max_abs

    def __str__(self) -> str:
        verdict = "pass" if self.passed else ("NaN/Inf" if not self.finite else "FAIL")
        return (f"rel_l2 {self.rel_l2:.2e} (<= {self.tolerance.rel_l2:.0e}), "
                f"max_abs {self.max_abs:.2e} (<= {self.tolerance.max_abs:.0e}): {verdict}")


def compare(out: torch.Tensor, ref: torch.Tensor, component: str, dtype: str) -> Comparison:
    """Errors of `out` against the reference `ref`, judged by the table's row for (component, dtype)."""
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = bool(torch.isfinite(o).all() and torch.isfinite(r).all())
    if not finite:
        return Comparison(math.inf, math.inf, False, TOLERANCES[(component, dtype)])
    diff = o - r
    rel = (diff.norm() / r.norm().clamp_min(1e-30)).item()
    return Comparison(rel, diff.abs().max().item(), True, TOLERANCES[(component, dtype)])


def psnr(image: torch.Tensor, ref: torch.Tensor, peak: float = 255.0) -> float:
    """PSNR in dB of two images of the same shape (8-bit range by default); inf when identical."""
    mse = ((image.double() - ref.double()) ** 2).mean().item()
    if not math.isfinite(mse):
        return -math.inf
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
