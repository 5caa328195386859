"""What a PNG written by `ldm-rt run` says about itself: PNG tEXt chunks (PIL `PngInfo`).

`parameters` holds the whole recipe in the one-string form other generators write (AUTOMATIC1111's
web UI, read by most image viewers and galleries): the prompt, then `Negative prompt: ...`, then
`Key: value` pairs. Each value is also its own chunk (`prompt`, `seed`, `steps`, ...), so a
script reads one without parsing: `PIL.Image.open(path).text["seed"]`.
"""

from __future__ import annotations

from PIL.PngImagePlugin import PngInfo

from ldm_rt import __version__


def png_info(*, prompt, negative_prompt: str, seed: int, steps: int, guidance: float, height: int, width: int,
             model: str, backend: str, batch: tuple[int, int] | None = None, strength: float | None = None,
             image: str | None = None, mask: str | None = None) -> PngInfo:
    """`batch` (index, size): the image's place in a batch drawn from one seed (all of a batch's
    noise comes from one generator, so the image is reproduced by the same batch and seed).
    Image-to-image: `strength` and the input image's (and inpainting mask's) file name."""
    fields = {
        "prompt": str(prompt),
        "negative_prompt": negative_prompt,
        "seed": str(seed),
        "steps": str(steps),
        "guidance": f"{guidance:g}",
        "size": f"{width}x{height}",
        "model": model,
        "backend": backend,
    }
    if batch is not None:
        fields["batch_index"], fields["batch_size"] = str(batch[0]), str(batch[1])
    if strength is not None:
        fields["strength"] = f"{strength:g}"
    if image is not None:
        fields["init_image"] = image
    if mask is not None:
        fields["mask_image"] = mask
    pairs = [("Steps", steps), ("CFG scale", fields["guidance"]), ("Seed", seed), ("Size", fields["size"]),
             ("Model", model), ("Backend", backend)]
    if batch is not None:
        pairs += [("Batch size", batch[1]), ("Batch pos", batch[0])]
    if strength is not None:  # AUTOMATIC1111 writes img2img's strength as "Denoising strength"
        pairs.append(("Denoising strength", fields["strength"]))
    if image is not None:
        pairs.append(("Init image", image))
    if mask is not None:
        pairs.append(("Mask", mask))
    pairs.append(("Version", f"ldm-rt {__version__}"))
    parameters = str(prompt)
    if negative_prompt:
        parameters += f"\nNegative prompt: {negative_prompt}"
    parameters += "\n" + ", ".join(f"{k}: {v}" for k, v in pairs)
    info = PngInfo()
    info.add_text("parameters", parameters)
    for key, value in fields.items():
        info.add_text(key, value)
    info.add_text("Software", f"ldm-rt {__version__}")
    return info
