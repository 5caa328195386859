"""Images handed to image-to-image and inpainting: read, check, resize, as diffusers' `VaeImageProcessor`.

An image is a PIL image, a path to an image file, or a float tensor (3, H, W) / (B, 3, H, W) in
[0, 1] (what `output_type="pt"` gives); a mask the same with one channel (or a PIL image of any
mode, converted to grayscale), white (1) = repaint, black (0) = keep, as diffusers.

Preprocessing follows `VaeImageProcessor.preprocess` (diffusers 0.42):
- the size defaults to the image's, rounded down to the model's size multiple
  (`get_default_height_width`); a PIL image is resized to (height, width) with Lanczos (its
  `resample` default), a tensor with `F.interpolate` (nearest, its default);
- image: `x / 255`, then `2x - 1` (do_normalize); mask: grayscale, `/ 255`, then binarised at 0.5
  (the inpaint pipelines' mask processor: do_normalize=False, do_binarize=True).
RGB conversion happens before the resize (diffusers converts after, and only when asked); for
an RGB or L file, the common case, the two orders give the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ldm_rt.errors import InputError


def open_image(image, what: str = "image", mask: bool = False):
    """`image` as a PIL image (RGB, or L for a mask) or a float32 tensor (B, C, H, W) in [0, 1]
    (C = 3, or 1 for a mask); InputError for anything else, naming `what`."""
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"{what} {path} does not exist or is not a file.")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            reason = "not an image file PIL can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise InputError(f"{what} {path} cannot be read as an image ({reason}); give a PNG or JPEG.") from None
    if isinstance(image, Image.Image):
        return image.convert("L" if mask else "RGB")
    if isinstance(image, torch.Tensor):
        channels = 1 if mask else 3
        x = image
        if mask and x.ndim == 2:
            x = x[None]
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != channels or x.shape[0] == 0 or 0 in x.shape[2:]:
            want = "(H, W), (1, H, W) or (B, 1, H, W)" if mask else "(3, H, W) or (B, 3, H, W)"
            raise InputError(f"{what} tensor has shape {tuple(image.shape)}; give {want} values in [0, 1].")
        if not x.is_floating_point():
            raise InputError(f"{what} tensor has dtype {x.dtype}; give floats in [0, 1] (e.g. uint8 / 255).")
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InputError(f"{what} tensor values must be finite and lie in [0, 1] (as output_type='pt' gives).")
        return x
    raise InputError(f"{what} must be a PIL image, a path to an image file or a tensor in [0, 1], "
                     f"not {type(image).__name__}.")


def image_size(image) -> tuple[int, int]:
    """(height, width) of an `open_image` result."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[2]), int(image.shape[3])


def image_batch(image) -> int:
    return 1 if isinstance(image, Image.Image) else int(image.shape[0])


def default_size(image, multiple: int) -> tuple[int, int]:
    """The image's (height, width) rounded down to `multiple` (diffusers' `get_default_height_width`)."""
    height, width = image_size(image)
    return height - height % multiple, width - width % multiple


def preprocess(image, height: int, width: int, mask: bool = False) -> torch.Tensor:
    """An `open_image` result -> float32 (B, C, height, width): an image in [-1, 1], a mask in {0, 1}."""
    if isinstance(image, Image.Image):
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
        arr = np.asarray(image).astype(np.float32) / 255.0  # (H, W, 3) or (H, W)
        x = torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr).permute(2, 0, 1)[None]
    else:
        x = image if image_size(image) == (height, width) else F.interpolate(image, size=(height, width))
    if mask:
        return torch.where(x < 0.5, 0.0, 1.0)
    return 2.0 * x - 1.0


def tile(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """(b, ...) -> (batch, ...) by repeating the whole batch, as diffusers' pipelines do; b must divide batch."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise InputError(f"{x.shape[0]} {what}s for a batch of {batch} images; give 1, or a number that divides "
                         f"{batch}.")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))
