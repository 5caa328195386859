"""Seeded non-trivial weights for oracle tests, independent of ldm_rt's own `randomize_`."""

import torch


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial: norm scales ~ 1 + N(0, 0.1), everything else ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise)
