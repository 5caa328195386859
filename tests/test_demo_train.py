"""Demo-model training code on the `tiny` demo config (CPU, seconds)."""

import json
import shutil

import numpy as np
import pytest
import torch

from ldm_rt.demo import train as T
from ldm_rt.demo.shapes import VOCABULARY, heldout_captions


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP's spinning threads slow down 10x when
    other processes share the 2 cores (20 tiny VAE steps: 43 s at 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(stage, run_dir, steps, **kw):
    kw = {"config": "tiny", "progress": False, "log_every": 5, "ckpt_every": 2, **kw}
    return T.train(stage, run_dir, steps, **kw)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A run dir with a (briefly) trained tiny VAE."""
    run_dir = tmp_path_factory.mktemp("run") / "vae"
    _run("vae", run_dir, 6)
    return run_dir


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    for name in ("dit.pt", "log.jsonl"):
        (dst / name).unlink(missing_ok=True)
    return dst


def test_tokenizer_words_are_single_tokens_and_unknown_words_fall_back_to_bytes():
    tok = T.build_tokenizer(32)
    for word in VOCABULARY:
        out = tok(word)
        assert out.attention_mask.sum() == 3, word  # bos, the word, eos
    longest = max(heldout_captions(), key=len) + " and a pink square in the bottom right corner"
    assert not tok(longest).truncated[0]
    out = tok(["a zebra with wings, 3 ÄÖ!", "", "red " * 100])
    assert out.input_ids.shape == (3, 32) and out.input_ids.max() < tok.vocab_size
    body = out.input_ids[0, 1 : out.attention_mask[0].sum() - 1]
    assert (body != tok.eos_token_id).all()  # byte symbols, never the unk (= eos) id
    assert out.truncated == [False, False, True]


@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_loss_is_finite_and_decreases_on_a_fixed_batch(stage, vae_run, tmp_path):
    run_dir = tmp_path / "run" if stage == "vae" else _copy_run(vae_run, tmp_path / "run")
    losses = _run(stage, run_dir, 20, overfit=True)
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20] and all(r["stage"] == stage for r in log)


def _state(path, keys):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return {f"{k}.{n}": v for k in keys for n, v in ck[k].items()}


@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_resume_is_bit_identical_to_a_straight_run(stage, vae_run, tmp_path):
    if stage == "vae":
        a, b, keys = tmp_path / "a", tmp_path / "b", ["vae"]
    else:
        a, b, keys = _copy_run(vae_run, tmp_path / "a"), _copy_run(vae_run, tmp_path / "b"), ["dit", "text_encoder", "ema"]
    _run(stage, a, 4)
    assert torch.load(a / f"{stage}.pt", weights_only=False)["step"] == 4
    resumed = _run(stage, a, 8)
    assert len(resumed) == 4  # steps 5..8 only
    _run(stage, b, 8)
    sa, sb = _state(a / f"{stage}.pt", keys), _state(b / f"{stage}.pt", keys)
    assert sa.keys() == sb.keys()
    for name in sa:
        if stage == "vae":
            assert torch.equal(sa[name], sb[name]), name
        else:
            # Not bit-identical on CPU: the gradients of x_embedder.proj and blocks.0.cross_attn.proj
            # differ in the last bits between two *straight* runs in one process (they depend on
            # the process's allocation history); Adam turns such noise into steps of up to lr, so the
            # bound is steps x lr (8 x 2e-3). Unresolved: see the report of the training-code PR.
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=2e-2, msg=name)


def test_export_loads_and_generates_with_the_run_defaults(vae_run, tmp_path):
    from ldm_rt.pipeline import Pipeline

    run_dir = _copy_run(vae_run, tmp_path / "run")
    _run("dit", run_dir, 3)
    out = _run("export", run_dir, 0, out=tmp_path / "model")
    pipe = Pipeline.from_pretrained(out, device="cpu")
    cfg = T.demo_config("tiny")
    assert pipe.defaults == cfg.defaults
    vae = pipe.config.vae
    assert vae.shift_factor is not None and vae.scaling_factor > 0
    weights = [p for p in out.rglob("*.safetensors")]
    assert len(weights) == 3
    images = pipe.generate(["a red circle on the left", "", "a zebra with wings"], seed=1).images
    assert [im.size for im in images] == [(cfg.image_size, cfg.image_size)] * 3


def test_warm_start_from_an_exported_model(vae_run, tmp_path):
    """--init-from: a run dir without dit.pt goes on from an exported model's weights, at its step."""
    from ldm_rt.errors import InputError
    from ldm_rt.model_dir import load_model_dir

    run_dir = _copy_run(vae_run, tmp_path / "run")
    _run("dit", run_dir, 3)
    model = _run("export", run_dir, 0, out=tmp_path / "model")
    info = json.loads((model / T.TRAINING_INFO).read_text())
    assert (info["config"], info["seed"], info["dit_step"], info["weights"]) == ("tiny", 0, 3, "EMA")

    warm = _copy_run(vae_run, tmp_path / "warm")
    losses = _run("dit", warm, 4, init_from=model, lr=1e-12)  # one step that cannot move the weights
    assert len(losses) == 1
    ck = torch.load(warm / "dit.pt", weights_only=False)
    assert (ck["step"], ck["init_step"]) == (4, 3)
    exported = load_model_dir(model)
    for name, value in exported.transformer.state_dict().items():
        torch.testing.assert_close(ck["dit"][name], value.float(), rtol=0, atol=1e-6, msg=name)
    assert len(_run("dit", warm, 6)) == 2  # and it resumes from its own checkpoint after that

    with pytest.raises(InputError, match="drop --init-from"):
        _run("dit", warm, 8, init_from=model)
    with pytest.raises(InputError, match="applies to --stage dit"):
        _run("vae", warm, 8, init_from=model)
    with pytest.raises(InputError, match="has no training.json"):
        _run("dit", _copy_run(vae_run, tmp_path / "w2"), 5, init_from=vae_run)
    other = tmp_path / "other"
    shutil.copytree(model, other)
    (other / T.TRAINING_INFO).write_text(json.dumps({**info, "seed": 1}))
    with pytest.raises(InputError, match="seed 1"):
        _run("dit", _copy_run(vae_run, tmp_path / "w3"), 5, init_from=other)
    info_vae = json.loads((other / "vae" / "config.json").read_text())
    (other / T.TRAINING_INFO).write_text(json.dumps(info))
    (other / "vae" / "config.json").write_text(json.dumps({**info_vae, "scaling_factor": 2 * info_vae["scaling_factor"]}))
    with pytest.raises(InputError, match="another VAE"):
        _run("dit", _copy_run(vae_run, tmp_path / "w4"), 5, init_from=other)


def test_a_run_keeps_one_tokenizer_and_an_old_cache_renumbers_a_rebuilt_one(vae_run, tmp_path):
    """BPE training breaks ties at random, so the tokenizer is built once per run dir and every
    stage (dit, export) uses that one; a run dir from before, with only its latent cache, gets
    a rebuilt tokenizer renumbered to the cached ids."""
    from ldm_rt.errors import InputError
    from ldm_rt.tokenizer import CLIPTokenizer

    cfg = T.demo_config("tiny")
    run_dir = _copy_run(vae_run, tmp_path / "run")
    _run("dit", run_dir, 2)
    kept = CLIPTokenizer.from_dir(run_dir / T.RUN_TOKENIZER, 32)
    model = _run("export", run_dir, 0, out=tmp_path / "model")
    assert CLIPTokenizer.from_dir(model / "tokenizer", 32).vocab == kept.vocab
    cache = torch.load(run_dir / "latents.pt", weights_only=False)

    vocab, merges = T._bpe_vocab_merges()
    vocab["a</w>"], vocab["red</w>"] = vocab["red</w>"], vocab["a</w>"]  # a build with other ties ("a" is in every caption)
    with pytest.raises(InputError, match="does not give the cached captions"):
        T.check_tokenizer(CLIPTokenizer.from_vocab(vocab, merges, 32), cache, "test")
    renumbered = CLIPTokenizer.from_vocab(T.renumber_to_cache(vocab, cache), merges, 32)
    assert torch.equal(renumbered(cache["captions"]).input_ids, cache["input_ids"])

    shutil.rmtree(run_dir / T.RUN_TOKENIZER)  # an old run dir: only the cache holds the ids
    assert T.run_tokenizer(cfg, run_dir)(cache["captions"]).input_ids.equal(cache["input_ids"])
    assert (run_dir / T.RUN_TOKENIZER / "tokenizer.json").is_file()


def test_run_dir_pins_config_and_seed(tmp_path):
    from ldm_rt.errors import InputError

    _run("vae", tmp_path / "r", 1)
    with pytest.raises(InputError, match="was started with"):
        _run("vae", tmp_path / "r", 2, seed=1)
    with pytest.raises(InputError, match="--stage dit"):
        _run("export", tmp_path / "r", 0, out=tmp_path / "m")


def test_lr_schedule_warms_up_decays_to_a_tenth_and_holds():
    peak = 1e-3
    assert T.lr_at(0, peak, 10) == pytest.approx(1e-4)
    assert T.lr_at(500, peak, 10) == peak  # no decay configured: constant
    assert T.lr_at(9, peak, 10, 110) == pytest.approx(peak)
    assert T.lr_at(60, peak, 10, 110) == pytest.approx(peak * 0.55)
    assert T.lr_at(110, peak, 10, 110) == pytest.approx(peak / 10)
    assert T.lr_at(10_000, peak, 10, 110) == pytest.approx(peak / 10)


def test_vae_crops_are_mostly_centred_on_the_foreground():
    cfg = T.demo_config("demo")
    gen = torch.Generator().manual_seed(0)
    x = T.vae_batch(cfg, seed=0, step=3, batch=32, gen=gen)
    assert x.shape == (32, 3, cfg.vae_crop, cfg.vae_crop)
    centre = x[:, :, cfg.vae_crop // 2, cfg.vae_crop // 2]  # (B, 3)
    corner_bg = x[:, :, 0, 0]
    # a crop centred on a foreground pixel has a centre colour unlike at least one of its corners
    # most of the time; uniform crops of 64 px from 128 px scenes almost never do
    differs = ((centre - corner_bg).abs().sum(1) > 0.3).float().mean().item()
    assert differs > 0.5


def test_caption_variation_changes_from_its_step_and_a_resume_stays_exact():
    """`caption_variation_from` switches the caption mix at a step: earlier steps keep the old
    mix (so the run that made an earlier model is unchanged), later ones draw the new one."""
    from dataclasses import replace

    from ldm_rt.demo.shapes import CaptionVariation, sample_scenes, vary_caption

    first = CaptionVariation(unknown_word=0.0)  # no non-words: the captions must parse
    later = CaptionVariation(omit_position=0.9, omit_background=0.9, unknown_word=0.0)
    cfg = replace(T.demo_config("tiny"), caption_variation=first, caption_variation_from=((7, later),))
    assert cfg.caption_variation_at(0) is first and cfg.caption_variation_at(6) is first
    assert cfg.caption_variation_at(7) is later and cfg.caption_variation_at(10**6) is later
    demo = T.demo_config("demo")
    assert demo.caption_variation_at(15_999) == CaptionVariation()  # the step-10000..16000 run's mix
    specs = [s.spec() for s in sample_scenes(3, 400) if len(s.objects) == 1]
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    with_cell = [sum(o.cell is not None for o in T.parse_caption(vary_caption(s, rng, v)).objects)
                 for v, rng in ((first, rng_a), (later, rng_b)) for s in specs]
    n = len(specs)
    assert sum(with_cell[:n]) / n > 0.5 > 0.2 > sum(with_cell[n:]) / n
