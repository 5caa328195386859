"""The reference T5 encoder and tokenizer against transformers' T5EncoderModel / T5TokenizerFast."""

import pytest
import torch

from ldm_rt.models.t5 import T5_PRESETS, T5Config, T5EncoderModel, T5Tokenizer, tie_embedding_keys
from random_weights import randomize_

transformers = pytest.importorskip("transformers")

# Odd sizes; buckets/max distance small enough that the log-spaced buckets are reached at M=37.
CONFIG = T5Config(vocab_size=101, d_model=36, d_kv=12, d_ff=52, num_layers=3, num_heads=3,
                  relative_attention_num_buckets=12, relative_attention_max_distance=20)


def _reference(config: T5Config, seed: int):
    hf = transformers.T5EncoderModel(transformers.T5Config(**config.to_dict())).eval()
    randomize_(hf, seed)
    ours = T5EncoderModel(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("masked", [False, True])
def test_matches_transformers(masked):
    hf, ours = _reference(CONFIG, seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 37), generator=g)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 29:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask if masked else None).last_hidden_state
        got = ours(ids, mask if masked else None)
    err = (got - expected).abs().max().item()
    print(f"t5 max-abs {err:.2e}")
    assert err <= 1e-5 and expected.abs().max() > 0.1


def test_names_and_tied_embedding():
    hf, ours = _reference(CONFIG, seed=7)
    assert set(ours.state_dict()) == set(hf.state_dict())
    sd = {k: v for k, v in hf.state_dict().items() if k != "encoder.embed_tokens.weight"}
    fresh = T5EncoderModel(CONFIG)
    fresh.load_state_dict(tie_embedding_keys(sd), strict=True)
    assert torch.equal(fresh.encoder.embed_tokens.weight, hf.shared.weight)
    assert T5Config.from_dict(T5_PRESETS["t5-v1_1-xxl"].to_dict()) == T5_PRESETS["t5-v1_1-xxl"]


def test_fp16_large_activations_stay_finite():
    """Scaled FFN output weights push the fp16 stream past 65504: the clamp keeps it finite,
    as in transformers; the same run without the clamp overflows (the test can fail)."""
    config = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
    model = T5EncoderModel(config)
    randomize_(model, 8)
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(9))
    half = model.half()
    with torch.no_grad():
        out = half(ids)
        assert torch.isfinite(out).all()
        import ldm_rt.models.t5 as t5

        saved = t5._clamp_fp16
        t5._clamp_fp16 = lambda x: x
        try:
            unclamped = half(ids)
        finally:
            t5._clamp_fp16 = saved
    assert not torch.isfinite(unclamped).all()


def _unigram_tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
              "a watercolor painting of mountains at sunrise", "the quick brown fox jumps over the lazy dog"] * 20
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tok.save(str(path))


def test_tokenizer_matches_t5_tokenizer_fast(tmp_path):
    path = tmp_path / "tokenizer.json"
    _unigram_tokenizer_json(path)
    texts = ["a photo of a cat", "An  astronaut, riding a horse on the Moon!", "",
             "the quick brown fox jumps over the lazy dog " * 4, "zebra ÿ 12"]
    n = 16
    ref = transformers.T5TokenizerFast(tokenizer_file=str(path))
    expected = ref(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    got = T5Tokenizer.from_file(path, max_length=n)(texts)
    assert got.shape == (len(texts), n)
    assert torch.equal(got, expected), (got, expected)
    assert (got[3] != ref.pad_token_id).all()  # the long text was truncated, its last id is </s>
    assert got[3, -1] == ref.eos_token_id


def test_tokenizer_missing_file(tmp_path):
    from ldm_rt.errors import ModelDirError

    with pytest.raises(ModelDirError, match="tokenizer_2"):
        T5Tokenizer.from_file(tmp_path / "nope.json", max_length=8)


def test_fp16_matches_transformers_fp16_loading(tmp_path):
    """transformers loads T5 in fp16 with `wo` kept fp32; `to_inference_dtype` does the same."""
    from ldm_rt.models.t5 import to_inference_dtype

    hf, _ = _reference(CONFIG, seed=13)
    hf.save_pretrained(tmp_path)
    hf16 = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16).eval()
    ours = T5EncoderModel(CONFIG).eval()
    ours.load_state_dict(hf.state_dict())
    to_inference_dtype(ours, torch.float16)
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in hf16.state_dict().items()}
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        expected, got, ref32 = hf16(input_ids=ids).last_hidden_state, ours(ids), hf(input_ids=ids).last_hidden_state
    assert got.dtype == expected.dtype
    err, err32 = (got.float() - expected.float()).abs().max().item(), (got.float() - ref32).abs().max().item()
    print(f"t5 fp16 vs transformers fp16 max-abs {err:.2e}, vs fp32 {err32:.2e}")
    assert err <= 1e-2 and err32 <= 5e-2
