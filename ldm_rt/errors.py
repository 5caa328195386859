"""User-facing errors. Each one carries a single sentence that names the value and the fix.

The CLI prints `error: <message>` and exits non-zero for any `LdmRtError`; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib


class LdmRtError(Exception):
    """Base class for errors a user can fix (bad input, missing file, missing extra)."""


class ConfigError(LdmRtError):
    """A config file or preset name is wrong."""


class WeightsError(LdmRtError):
    """Weights are missing, corrupted, or do not match the model's parameters."""


class ModelDirError(LdmRtError):
    """A model directory or one of its components is missing or malformed."""


class InputError(LdmRtError, ValueError):
    """A call argument (size, steps, guidance, seed, prompt, path, device) is invalid.

    Also a `ValueError`, so Python callers can catch it as the builtin they expect for a bad value."""


class NonFiniteError(LdmRtError):
    """A stage produced NaN or Inf."""


class MissingDependencyError(LdmRtError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or fail with one sentence naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{purpose} needs the '{module}' package, which is not installed: "
            f"pip install 'ldm-rt[{extra}]'"
        ) from None
