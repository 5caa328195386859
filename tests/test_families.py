"""The family seam: a family registered from outside ldm-rt (this module) runs through the
generic pipeline, model-directory loading and backends without any generic file knowing it.

The toy family reuses the tiny text DiT but lays its latents out as tokens (B, h*w, C), as Flux
packs its latents, and steps without CFG (one transformer row per latent row, as Flux's
embedded guidance). With guidance 1 the text DiT runs no CFG either, so the two families must
draw the same image from the same seed: pack/unpack are a bijection and the step computes the
same arithmetic in the other layout.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from ldm_rt import families
from ldm_rt.configs import ModelConfig, read_json, write_json
from ldm_rt.errors import ModelDirError
from ldm_rt.families.base import StepFunction
from ldm_rt.families.dit_text import FAMILY as DIT_TEXT
from ldm_rt.model_dir import init_model, load_model_dir
from ldm_rt.pipeline import Pipeline

CALLS: dict[str, int] = {}


def token_step(transformer, update, tokens, t, coefficients, guidance, text_states, text_mask, pooled, *,
               dtype: torch.dtype, h: int, w: int) -> torch.Tensor:
    """tokens (B, h*w, C) fp32 -> tokens after one step, no CFG (`guidance` unused)."""
    latents = unpack_tokens(tokens, h, w)
    out = transformer(latents.to(dtype), t, text_states, text_mask, pooled).float()
    return pack_tokens(update(latents, out, coefficients))


def pack_tokens(x):  # (B, C, h, w) -> (B, h*w, C)
    return x.flatten(2).transpose(1, 2)


def unpack_tokens(x, h, w):  # (B, h*w, C) -> (B, C, h, w)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class ToyFamily(type(DIT_TEXT)):
    name = "toy-tokens"
    pipeline_classes = ("ToyTokensPipeline",)

    def recognizes(self, index, root):
        return index.get("_class_name") in self.pipeline_classes

    def owns(self, config):
        return False  # its models are found by name (`Components.family`), not by config

    def load(self, root, index):
        components = super().load(root, index)
        components.family = self.name
        return components

    def latent_shape(self, config, batch, height, width):
        shape = super().latent_shape(config, batch, height, width)
        self.grid = shape[-2:]  # the token grid the step unpacks to (Flux puts it in img_ids instead)
        return shape

    def pack(self, config, noise):
        CALLS["pack"] = CALLS.get("pack", 0) + 1
        return pack_tokens(noise)

    def unpack(self, config, latents, height, width):
        f = config.vae.scale_factor
        return unpack_tokens(latents, height // f, width // f)

    def image_seq_len(self, config, latents):
        return latents.shape[1] // config.transformer.patch_size ** 2

    def encode(self, pipe, request, guidance):
        return super().encode(pipe, request, 1.0)  # no unconditional half: guidance is not CFG here

    def step(self, pipe, scheduler, guidance, options):
        CALLS["step"] = CALLS.get("step", 0) + 1
        h, w = self.grid
        static = dict(dtype=pipe.precision.dtype, h=h, w=w)
        return StepFunction("toy-tokens", functools.partial(token_step, pipe.transformer, scheduler.update, **static),
                            static, batch_factor=1)

    def pipeline_methods(self, pipe):
        return {}


@pytest.fixture()
def toy_family():
    family = families.register(ToyFamily())
    CALLS.clear()
    yield family
    families.unregister(family.name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("families") / "tiny", "tiny", seed=5)


def _as_toy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    index = read_json(dst / "model_index.json", "model_index.json")
    write_json(dst / "model_index.json", {**index, "_class_name": "ToyTokensPipeline"})
    return dst


def test_a_family_registered_outside_ldm_rt_runs_the_generic_pipeline(toy_family, tiny_dir, tmp_path):
    toy_dir = _as_toy(tiny_dir, tmp_path / "toy")
    components = load_model_dir(toy_dir)
    assert components.family == "toy-tokens"
    pipe = Pipeline(components)
    assert pipe.family is toy_family
    kwargs = dict(steps=3, guidance=1.0, seed=11, height=40, width=24)
    got = np.array(pipe.generate("a red circle", **kwargs).images[0])
    assert CALLS == {"pack": 1, "step": 1}  # the toy's layout and step ran, not the text DiT's

    ref = Pipeline.from_pretrained(tiny_dir)
    assert ref.family is DIT_TEXT
    expected = np.array(ref.generate("a red circle", **kwargs).images[0])
    assert got.shape == (40, 24, 3) and got.std() > 0
    np.testing.assert_array_equal(got, expected)


def test_registry_recognition_and_presets(toy_family, tiny_dir, tmp_path):
    assert families.for_index({"_class_name": "ToyTokensPipeline"}, tmp_path) is toy_family
    assert families.for_index({"_class_name": "LdmRtPipeline"}, tiny_dir).name == "dit-text"
    assert families.for_index({"_class_name": "DiTPipeline"}, tmp_path).name == "dit-class"
    assert families.for_config(ModelConfig.from_name("tiny-class")).name == "dit-class"
    family, config = families.preset("tiny")
    assert family is DIT_TEXT and config == ModelConfig.from_name("tiny")
    with pytest.raises(ValueError, match="already registered"):
        families.register(ToyFamily())


def test_an_unknown_pipeline_class_is_one_sentence(tiny_dir, tmp_path):
    bad = _as_toy(tiny_dir, tmp_path / "flux-like")
    write_json(bad / "model_index.json", {"_class_name": "SomeOtherPipeline"})
    with pytest.raises(ModelDirError, match="SomeOtherPipeline.*no model family of ldm-rt loads; known: "):
        load_model_dir(bad)
