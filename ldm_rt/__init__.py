"""ldm-rt: an inference engine and exporter for latent diffusion transformers.

Imports are lazy: `import ldm_rt` loads neither the models nor any optional dependency.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from ldm_rt.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ldm_rt' has no attribute {name!r}")
