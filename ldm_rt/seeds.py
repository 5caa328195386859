"""Seeds: what a seed is, and a fresh one when the caller gives none.

A seed is an integer 0..2**64-1, the range `torch.Generator.manual_seed` takes (it accepts
negative values too, by wrapping them modulo 2**64; we refuse them, so one image has one seed).
The initial noise is `torch.randn(..., generator=torch.Generator("cpu").manual_seed(seed))`, as
in diffusers. Measured with torch 2.13: the CPU generator (mt19937) keeps only the low 32 bits of
the seed, so seeds s and s + 2**32 draw the same noise; a fresh seed is therefore drawn from
0..2**32-1, where every seed draws different noise.
"""

from __future__ import annotations

import secrets

from ldm_rt.errors import InputError

MAX_SEED = 2**64 - 1
RANDOM_SEED_BITS = 32


def check_seed(seed) -> int:
    """`seed` as an int in 0..2**64-1, else an InputError naming the range."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            ok = int(seed) == seed
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok or isinstance(seed, bool):
            raise InputError(f"seed {seed!r} is not a whole number; a seed is an integer from 0 to 2**64-1.")
        seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed {seed} is out of range; a seed is an integer from 0 to 2**64-1 ({MAX_SEED}).")
    return seed


def resolve_seed(seed) -> int:
    """None: a fresh random seed (0..2**32-1, see the module docstring); else `check_seed(seed)`."""
    if seed is None:
        return secrets.randbits(RANDOM_SEED_BITS)
    return check_seed(seed)
