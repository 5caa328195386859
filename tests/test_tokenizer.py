"""The CLIP tokenizer against transformers' CLIPTokenizer on the same vocab files.

Two vocabularies: OpenAI CLIP's real BPE (`bpe_simple_vocab_16e6.txt.gz`, shipped inside the
open_clip_torch wheel; install it with `pip install --no-deps open_clip_torch`), and a small
CLIP-format BPE trained here with `tokenizers`, so the comparison runs without open_clip too.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_rt.configs import ModelConfig
from ldm_rt.errors import ModelDirError
from ldm_rt.tokenizer import CLIPTokenizer

import transformers  # a test dependency: missing means the install is broken, not a skip

MAX_LENGTH = 77

LONG_PARAGRAPH = (
    "A sprawling, highly detailed oil painting of a medieval harbour town at dusk: fishing boats "
    "with patched red sails, gulls circling above the lighthouse, lanterns glowing in 37 windows, "
    "merchants haggling over barrels of salted herring, children chasing a scruffy dog along the "
    "cobbled quay, and storm clouds gathering over the distant cliffs while the last rays of the "
    "sun turn the water into molten copper, painted in the style of the Dutch golden age masters."
)
SENTENCES = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "An astronaut riding a horse on Mars, 4k, trending on ArtStation.",
    "it's a dog's life, isn't it? We'll see; they've said you'd come, I'm sure.",
    "Don't stop!!! Wait... what?!",
    "   leading and trailing whitespace   ",
    "extra   spaces\tand\ttabs\n\nand newlines",
    "café au lait, naïve résumé, Ångström",
    "cafe\u0301 written with a combining accent",  # NFC folds it into "café"
    "1,234.56 dollars; 50% off; version 3.10; 2024-01-31",
    "e-mail me at someone@example.com #hashtag @handle",
    "quotes: \"double\" and 'single' and `back`",
    "emoji 🐱🚀 and symbols © ™ € ≥",
    "東京の夜景 and Москва and Ελλάδα",
    "UPPERCASE SHOUTING WITH NUMBERS 123",
    "a",
    "",
    "a <|endoftext|> in the middle of a prompt",
    "hello! wow!! (parentheses) [brackets] {braces}",
    LONG_PARAGRAPH,
]

# A few paragraphs of English for the BPE trained here.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's a classic sentence that uses every letter.",
    "Latent diffusion models denoise a compressed representation of an image, then decode it.",
    "A photo of a cat sitting on a windowsill, soft morning light, shallow depth of field.",
    "We'll render the painting at 512 by 512 pixels; they've asked for 30 steps and guidance 7.5.",
    "Tokenizers split text into words, then into byte-pair pieces that the model has seen.",
    "An astronaut riding a horse on the moon, highly detailed, dramatic lighting, 4k wallpaper.",
] * 3


def clip_byte_symbols() -> list[str]:
    """OpenAI CLIP's bytes_to_unicode() values, in its order (written out independently here)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(folder: Path, merges: list[tuple[str, str]]) -> Path:
    """vocab.json + merges.txt laid out as OpenAI's SimpleTokenizer builds its encoder."""
    symbols = clip_byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in the vocab"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def clip_vocab_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        # A failure, not a skip: the README's test command installs it, and a silently skipped
        # oracle would hide a missing install step in CI.
        pytest.fail("open_clip_torch is not installed (pip install --no-deps open_clip_torch==3.3.0, as the "
                    "README's test command does): it ships CLIP's bpe_simple_vocab_16e6.txt.gz")
    # Found without importing open_clip, whose import needs torchvision.
    gz = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"), merges)


@pytest.fixture(scope="module")
def trained_vocab_dir(tmp_path_factory) -> Path:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=800, min_frequency=2, show_progress=False, end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    assert len(merges) > 100
    return write_clip_vocab(tmp_path_factory.mktemp("trained_vocab"), merges)


def reference(folder: Path, texts: list[str], max_length: int = MAX_LENGTH, **kwargs):
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder), **kwargs)
    out = hf(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    full = hf(texts, add_special_tokens=True)["input_ids"]  # without truncation
    return out["input_ids"], out["attention_mask"].bool(), [len(ids) > max_length for ids in full]


def assert_matches(ours: CLIPTokenizer, folder: Path, texts: list[str], **kwargs):
    ids, mask, truncated = reference(folder, texts, ours.max_length, **kwargs)
    out = ours(texts)
    assert out.input_ids.dtype == torch.long and out.attention_mask.dtype == torch.bool
    for i, text in enumerate(texts):
        assert out.input_ids[i].tolist() == ids[i].tolist(), text
        assert out.attention_mask[i].tolist() == mask[i].tolist(), text
    assert out.truncated == truncated


def test_real_clip_vocab_matches_transformers(clip_vocab_dir):
    ours = CLIPTokenizer.from_dir(clip_vocab_dir, max_length=MAX_LENGTH)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert_matches(ours, clip_vocab_dir, SENTENCES)
    # Ids published for OpenAI CLIP, independent of both implementations.
    assert ours("a photo of a cat").input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    out = ours(SENTENCES)
    assert out.truncated == [text is LONG_PARAGRAPH for text in SENTENCES]
    assert out.input_ids[-1, -1].item() == ours.eos_token_id and out.attention_mask[-1].all()


def test_trained_vocab_matches_transformers(trained_vocab_dir):
    ours = CLIPTokenizer.from_dir(trained_vocab_dir, max_length=MAX_LENGTH)
    assert_matches(ours, trained_vocab_dir, SENTENCES + TRAINING_TEXT[:6])
    assert ours(LONG_PARAGRAPH).truncated == [True]
    short = CLIPTokenizer.from_dir(trained_vocab_dir, max_length=12)
    assert_matches(short, trained_vocab_dir, SENTENCES)


def test_strip_punctuation_is_off_by_default_and_kept_by_save(clip_vocab_dir, tmp_path):
    """CLIP keeps its punctuation ids (parity with transformers); the flag the demo tokenizer sets
    turns punctuation into spaces and survives save / from_dir."""
    plain = CLIPTokenizer.from_dir(clip_vocab_dir, max_length=MAX_LENGTH)
    assert not plain.strip_punctuation
    texts = ["A red circle, on the left.", "red-circle (top)!"]
    assert_matches(plain, clip_vocab_dir, texts)
    strip = CLIPTokenizer.from_dir(clip_vocab_dir, max_length=MAX_LENGTH, strip_punctuation=True)
    assert torch.equal(strip(texts).input_ids, plain(["a red circle on the left", "red circle top"]).input_ids)
    assert not torch.equal(strip(texts).input_ids, plain(texts).input_ids)
    strip.save(tmp_path / "strip")
    plain.save(tmp_path / "plain")
    assert "ldm_rt_strip_punctuation" not in (tmp_path / "plain" / "tokenizer_config.json").read_text()
    again = CLIPTokenizer.from_dir(tmp_path / "strip")
    assert again.strip_punctuation and torch.equal(again(texts).input_ids, strip(texts).input_ids)
    assert not CLIPTokenizer.from_dir(tmp_path / "plain").strip_punctuation


def test_tokenizer_json_equals_vocab_and_merges(clip_vocab_dir, tmp_path):
    from_files = CLIPTokenizer.from_dir(clip_vocab_dir, max_length=MAX_LENGTH)
    # transformers' own tokenizer.json (model_max_length unset: the argument decides).
    transformers.CLIPTokenizer.from_pretrained(str(clip_vocab_dir)).save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "vocab.json").exists()
    from_hf_json = CLIPTokenizer.from_dir(tmp_path / "hf", max_length=MAX_LENGTH)
    # Ours, saved and read back.
    from_files.save(tmp_path / "ours")
    from_our_json = CLIPTokenizer.from_dir(tmp_path / "ours")
    expected = from_files(SENTENCES)
    for tok in (from_hf_json, from_our_json):
        assert tok.max_length == MAX_LENGTH
        out = tok(SENTENCES)
        assert torch.equal(out.input_ids, expected.input_ids)
        assert torch.equal(out.attention_mask, expected.attention_mask)
        assert out.truncated == expected.truncated


def test_sd2_pad_token(trained_vocab_dir, tmp_path):
    folder = tmp_path / "sd2"
    shutil.copytree(trained_vocab_dir, folder)
    special = {
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "pad_token": "!",
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer", **special}))
    ours = CLIPTokenizer.from_dir(folder, max_length=MAX_LENGTH)
    assert ours.pad_token_id == 0 and ours.max_length == MAX_LENGTH
    assert_matches(ours, folder, SENTENCES)
    out = ours("a cat")
    assert out.input_ids[0, 4:].eq(0).all() and out.attention_mask[0].sum().item() == 4


def test_byte_level_round_trip(tmp_path):
    te = ModelConfig.from_name("tiny").text_encoder
    tok = CLIPTokenizer.byte_level(te.bos_token_id, te.eos_token_id, te.pad_token_id,
                                   te.max_position_embeddings, vocab_size=te.vocab_size)
    out = tok(SENTENCES)
    assert out.input_ids.shape == (len(SENTENCES), te.max_position_embeddings)
    assert out.input_ids.max().item() < te.vocab_size and tok.vocab_size <= te.vocab_size
    assert out.input_ids[:, 0].eq(te.bos_token_id).all()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (998, 999, 999)
    assert tok.decode(tok("Hello, café!").input_ids[0].tolist()) == "hello , café !"

    tok.save(tmp_path)
    again = CLIPTokenizer.from_dir(tmp_path)
    assert again.max_length == te.max_position_embeddings
    assert torch.equal(again(SENTENCES).input_ids, out.input_ids)
    assert again(SENTENCES).truncated == out.truncated
    # transformers reads what we wrote, and agrees.
    assert_matches(again, tmp_path, SENTENCES)

    with pytest.raises(ValueError, match="vocab_size"):
        CLIPTokenizer.byte_level(998, 999, 999, 32, vocab_size=999)
    with pytest.raises(ValueError, match=">= 512"):
        CLIPTokenizer.byte_level(3, 999, 999, 32)
    sd2_style = CLIPTokenizer.byte_level(998, 999, 0, 16)
    assert sd2_style.pad_token == "!" and sd2_style("a").input_ids[0, 3:].eq(0).all()


def test_from_dir_errors_and_lengths(trained_vocab_dir, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        CLIPTokenizer.from_dir(tmp_path / "nope", max_length=MAX_LENGTH)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="neither tokenizer.json nor vocab.json"):
        CLIPTokenizer.from_dir(tmp_path / "empty", max_length=MAX_LENGTH)
    with pytest.raises(ModelDirError, match="model_max_length"):
        CLIPTokenizer.from_dir(trained_vocab_dir)
    folder = tmp_path / "with_config"
    shutil.copytree(trained_vocab_dir, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    assert CLIPTokenizer.from_dir(folder).max_length == 77
    assert CLIPTokenizer.from_dir(folder, max_length=32).max_length == 32  # the smaller wins
    assert CLIPTokenizer.from_dir(folder, max_length=100).max_length == 77


def test_does_not_import_transformers():
    code = "import sys, ldm_rt.tokenizer; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
