"""Triton kernels (installed as `ldm_rt.kernels`).

Each op lives in its own file with its launcher; the plain-PyTorch reference it must match is
the function of the same name in `ldm_rt.ops`. Nothing here imports triton at package import.
"""
