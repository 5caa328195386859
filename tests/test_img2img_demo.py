"""Image-to-image and inpainting on the built-in demo model, read by the demo's classifier
(`ldm_rt.demo.img2img_eval`): held-out scenes, each with a conflicting prompt. About 70 s on 2
CPU cores, hence `slow`. Thresholds sit below the rates measured on 12 scenes (README,
"Image-to-image and inpainting"): strength 0.3 kept the position 12/12, strength 1 followed the
prompt 12/12, inpainting drew both objects 12/12 with the kept half within 3.5/255 on average."""

from __future__ import annotations

import pytest
import torch

from ldm_rt.demo.img2img_eval import measure
from ldm_rt.model_dir import default_model_dir
from ldm_rt.pipeline import Pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rates():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe = Pipeline.from_pretrained(default_model_dir(), device="cpu", dtype="fp32")
        return measure(pipe, n=6, seed=1)
    finally:
        torch.set_num_threads(threads)


def test_low_strength_keeps_the_input_layout(rates):
    low = rates["strength 0.3"]
    assert low["steps_run"] == 6  # of the demo's 20
    assert low["keeps"]["position"] >= 5 / 6
    assert low["follows"]["position"] <= 1 / 6


def test_strength_one_follows_the_prompt(rates):
    full = rates["strength 1"]
    assert full["follows"]["all"] >= 5 / 6
    assert full["keeps"]["position"] <= 1 / 6


def test_inpainting_keeps_the_unmasked_half_and_draws_the_new_object(rates):
    inpaint = rates["inpaint"]
    assert inpaint["two_objects_rate"] >= 5 / 6
    assert inpaint["kept_region_mean_abs_error_0_255"] <= 8.0
