"""Shared by the triton-backend tests: see that a model really routed to the kernels."""

from __future__ import annotations

from ldm_rt import kernels

SWAPS = ("attention", "layernorm_modulate", "gated_residual_layernorm_modulate")


def count_kernel_calls(monkeypatch, names=SWAPS) -> dict[str, int]:
    """Wrap the public kernels `names` so a test can count the calls the backend made to each."""
    calls = {}
    for name in names:
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls
