"""CUDA runs of the reference pipeline in fp16/bf16, held to the fp32 result by the tolerance
table. Marked `gpu`: skipped on machines without CUDA (see conftest.py)."""

import numpy as np
import pytest
import torch

from ldm_rt.model_dir import load_model_dir
from ldm_rt.parity import IMAGE_PSNR_DB, compare, psnr
from ldm_rt.pipeline import Pipeline

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dit_low_precision_on_cuda_within_table(tiny_model_dir, dtype):
    components = load_model_dir(tiny_model_dir)
    ref_model = components.transformer.cuda()
    g = torch.Generator().manual_seed(0)
    cfg = ref_model.config
    latents = torch.randn(3, cfg.in_channels, 10, 14, generator=g).cuda()
    t = (torch.rand(3, generator=g) * 1000).cuda()
    text = torch.randn(3, 7, cfg.context_dim, generator=g).cuda()
    mask = torch.ones(3, 7, dtype=torch.bool, device="cuda")
    mask[0, 4:] = False
    pooled = torch.randn(3, cfg.pooled_dim, generator=g).cuda()
    with torch.no_grad():
        ref = ref_model(latents, t, text, mask, pooled)
        low_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        low = load_model_dir(tiny_model_dir).transformer.cuda().to(low_dtype)
        out = low(latents.to(low_dtype), t, text.to(low_dtype), mask, pooled.to(low_dtype))
    result = compare(out.float(), ref, "transformer", dtype)
    assert result.passed, str(result)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_pipeline_on_cuda_matches_fp32_image(tiny_model_dir, dtype):
    kwargs = dict(steps=8, seed=3, height=32, width=48)
    ref = Pipeline.from_pretrained(tiny_model_dir, device="cuda", dtype="fp32")("a red circle", **kwargs)[0]
    pipe = Pipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=dtype)
    image = pipe("a red circle", **kwargs)[0]
    assert image.size == (48, 32)
    db = psnr(torch.from_numpy(np.asarray(image)), torch.from_numpy(np.asarray(ref)))
    assert db >= IMAGE_PSNR_DB[dtype], f"{dtype} image PSNR {db:.1f} dB against fp32"


def test_default_device_and_dtype_on_cuda(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    assert pipe.device.type == "cuda" and pipe.precision.value == "fp16"
