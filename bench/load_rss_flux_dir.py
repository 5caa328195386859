"""Peak host RSS while `load_model_dir` reads a whole bf16 FLUX.1 directory, against its weights (CPU).

Writes a random FluxPipeline directory (transformer, T5, CLIP-L, the FLUX.1 VAE; about 1 GB in
bf16, transformer and T5 sharded) with `save_model_dir`, then loads it through the Flux family in
a fresh process and reads the peak RSS (VmHWM) above the RSS after imports. Target <= 1.3x
(issue 16); `bench/load_rss.py` measures the transformer alone.

    nice -n 10 python bench/load_rss_flux_dir.py --out bench/results/load-rss-flux-dir-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# transformer as bench/load_rss.py (~207M parameters); T5 of 6 layers at width 1024 (~110M, vocab 32128).
TRANSFORMER = dict(num_layers=3, num_single_layers=6, attention_head_dim=128, num_attention_heads=8,
                   joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True)
T5 = dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=6, num_heads=16)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write(root: Path) -> int:
    from ldm_rt import families
    from ldm_rt.families.flux.loading import FluxComponents, char_t5_tokenizer, run_defaults
    from ldm_rt.families.flux.transformer import FluxTransformer2DModel
    from ldm_rt.model_dir import save_model_dir
    from ldm_rt.models.t5 import T5EncoderModel
    from ldm_rt.models.text_encoder import CLIPTextModel
    from ldm_rt.models.vae import AutoencoderKL
    from ldm_rt.tokenizer import CLIPTokenizer
    from ldm_rt.weights import empty_module

    base = families.get("flux").presets()["flux-dev"]
    config = dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, **TRANSFORMER),
                                 text_encoder_2=dataclasses.replace(base.text_encoder_2, **T5))
    g = torch.Generator().manual_seed(0)
    modules = [empty_module(f, torch.bfloat16) for f in (
        lambda: CLIPTextModel(config.text_encoder), lambda: T5EncoderModel(config.text_encoder_2),
        lambda: FluxTransformer2DModel(config.transformer), lambda: AutoencoderKL(config.vae))]
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.normal_(0.0, 0.02, generator=g)
    te = config.text_encoder
    defaults = run_defaults(config.transformer)
    components = FluxComponents(
        modules[0], CLIPTokenizer.byte_level(te.bos_token_id, te.eos_token_id, te.pad_token_id,
                                             te.max_position_embeddings, vocab_size=te.vocab_size),
        modules[2], modules[3], dict(config.scheduler), defaults, family="flux", text_encoder_2=modules[1],
        tokenizer_2=char_t5_tokenizer(defaults["max_sequence_length"]))
    # shards of <= 100 MB, so the streaming loader crosses files
    import ldm_rt.families.flux.loading as loading

    loading.TRANSFORMER_SHARD_BYTES = loading.T5_SHARD_BYTES = 100 * 10**6
    save_model_dir(components, root, dtype=torch.bfloat16)
    return sum(p.stat().st_size for p in root.rglob("*.safetensors"))


def load(root: Path) -> dict:
    import ldm_rt.families.flux.loading  # noqa: F401  (the loader's imports before the baseline)
    from ldm_rt import families
    from ldm_rt.model_dir import load_model_dir

    families.families()
    before = _status("VmRSS")
    components = load_model_dir(root)
    peak = _status("VmHWM")
    module_bytes = sum(p.numel() * p.element_size() for m in components.modules().values() for p in m.parameters())
    assert all(torch.isfinite(p).all() for m in components.modules().values() for p in m.parameters())
    return {"rss_before": before, "peak_rss": peak, "module_bytes": module_bytes,
            "dtypes": {k: str(next(m.parameters()).dtype) for k, m in components.modules().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/load-rss-flux-dir-cpu"))
    ap.add_argument("--_load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._load:
        print(json.dumps(load(Path(args._load))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "flux"
        weight_bytes = write(root)
        files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*.safetensors"))}
        out = subprocess.run([sys.executable, __file__, "--_load", str(root)], check=True, capture_output=True,
                             text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["ratio"] = (r["peak_rss"] - r["rss_before"]) / weight_bytes
    result = {"what": "peak host RSS above the pre-load RSS while load_model_dir reads a bf16 FluxPipeline directory, "
                      "/ bytes of its safetensors files", "transformer": TRANSFORMER, "t5": T5,
              "weight_bytes": weight_bytes, "files": files, "torch": torch.__version__, "load": r,
              "command": " ".join(["python"] + sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"weights {weight_bytes / 2**20:.0f} MiB in {len(files)} files; loaded as {r['dtypes']}")
    print(f"peak RSS +{(r['peak_rss'] - r['rss_before']) / 2**20:.0f} MiB = {r['ratio']:.2f}x the weights "
          f"(absolute peak {r['peak_rss'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
