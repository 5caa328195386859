"""The CLIP text encoder against transformers' CLIPTextModel on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from ldm_rt.configs import TextEncoderConfig
from ldm_rt.errors import InputError, WeightsError
from ldm_rt.models.text_encoder import CLIPTextModel, load_text_encoder, text_encoder_state_dict_from_file
from ldm_rt.weights import read_safetensors

import transformers  # a test dependency: missing means the install is broken, not a skip

VOCAB, BOS, EOS = 1000, 998, 999
SEQ = 77
ATOL = 1e-5  # fp32, max-abs on LayerNorm-scale outputs


def hf_model(eos_token_id: int, hidden_act: str = "quick_gelu", seed: int = 0):
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=SEQ, hidden_act=hidden_act,
        bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    # Fresh random values everywhere, LayerNorm scales around 1 and biases non-zero, so a
    # swapped or skipped parameter shows in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return model


def ours_from(hf) -> CLIPTextModel:
    return CLIPTextModel(TextEncoderConfig.from_dict(hf.config.to_dict())).eval()


def random_ids(eos_positions: list[int], pad_id: int, seed: int = 1) -> torch.Tensor:
    """bos, random body ids (below bos/eos), eos at the given position, pad after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, BOS, (len(eos_positions), SEQ), generator=g)  # (B, M)
    for row, p in enumerate(eos_positions):
        ids[row, 0], ids[row, p], ids[row, p + 1:] = BOS, EOS, pad_id
    return ids


def hf_outputs(hf, ids):
    with torch.no_grad():
        out = hf(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def assert_close(ours, ids, hf):
    with torch.no_grad():
        hidden, pooled = ours(ids)
    ref_hidden, ref_pooled = hf_outputs(hf, ids)
    assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape
    assert (hidden - ref_hidden).abs().max().item() <= ATOL
    assert (pooled - ref_pooled).abs().max().item() <= ATOL


def toggled_prefix(sd: dict) -> dict:
    """The spelling transformers did not produce: add `text_model.` or remove it."""
    if all(k.startswith("text_model.") for k in sd):
        return {k.removeprefix("text_model."): v for k, v in sd.items()}
    return {"text_model." + k: v for k, v in sd.items()}


@pytest.mark.parametrize(
    "eos_token_id, hidden_act, pad_id",
    [
        (2, "quick_gelu", EOS),  # legacy config: pooled at argmax(ids); SD1.x pads with eos
        (EOS, "quick_gelu", EOS),  # real eos id, pad == eos: pooled at the FIRST eos
        (EOS, "gelu", 0),  # real eos id, SD2-style pad "!" = 0
    ],
)
def test_matches_transformers(eos_token_id, hidden_act, pad_id):
    hf = hf_model(eos_token_id, hidden_act)
    ids = random_ids([5, 40, SEQ - 1], pad_id)  # batch 3, eos early / middle / last
    sd = hf.state_dict()
    with_position_ids = dict(sd)
    with_position_ids["text_model.embeddings.position_ids"] = torch.arange(SEQ)[None]
    with_position_ids["embeddings.position_ids"] = torch.arange(SEQ)[None]
    for checkpoint in (sd, toggled_prefix(sd), with_position_ids, toggled_prefix(with_position_ids)):
        ours = ours_from(hf)
        load_text_encoder(ours, checkpoint)
        assert_close(ours, ids, hf)


def test_loads_what_save_pretrained_writes(tmp_path):
    hf = hf_model(EOS)
    hf.save_pretrained(tmp_path)
    sd = read_safetensors(tmp_path / "model.safetensors", "text_encoder")
    # transformers 5.x writes the keys without the `text_model.` prefix; 4.x with it.
    major = int(transformers.__version__.split(".")[0])
    assert all(k.startswith("text_model.") == (major < 5) for k in sd), sorted(sd)[:3]
    config = TextEncoderConfig.from_dict(transformers.CLIPTextConfig.from_pretrained(tmp_path).to_dict())
    ours = CLIPTextModel(config).eval()
    load_text_encoder(ours, sd)
    assert_close(ours, random_ids([3, 17, 60], EOS), hf)


def test_state_dict_names_match_published_checkpoints():
    hf = hf_model(EOS)
    ours = ours_from(hf)
    expected = set(text_encoder_state_dict_from_file(hf.state_dict()))
    assert set(ours.state_dict()) == expected
    assert all(k.startswith("text_model.") for k in expected)
    assert not any("position_ids" in k for k in ours.state_dict())


def test_missing_key_is_named():
    hf = hf_model(EOS)
    sd = toggled_prefix(hf.state_dict())
    sd = {k: v for k, v in sd.items() if not k.endswith("layers.1.mlp.fc2.bias")}
    with pytest.raises(WeightsError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_text_encoder(ours_from(hf), sd)


def test_too_many_tokens_is_an_input_error():
    ours = ours_from(hf_model(EOS))
    with pytest.raises(InputError, match="positions"):
        ours(torch.zeros(1, SEQ + 1, dtype=torch.long))


def test_bf16_stays_close_to_fp32():
    hf = hf_model(EOS)
    ours = ours_from(hf)
    load_text_encoder(ours, hf.state_dict())
    ids = random_ids([5, 40, SEQ - 1], EOS)
    with torch.no_grad():
        ref, _ = ours(ids)
        low, pooled = ours.to(torch.bfloat16)(ids)
    assert low.dtype == pooled.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert torch.isfinite(low).all() and rel.item() < 2e-2
