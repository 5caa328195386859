"""T5 encoder (v1.1, as FLUX.1's text_encoder_2): a reference `T5EncoderModel` (transformers).

embed_tokens -> N blocks of [RMS norm -> self-attention with a learned relative position bias
(computed by the first block, shared by all), residual] and [RMS norm -> gated-GELU FFN,
residual] -> final RMS norm. T5 does not scale q k^T by 1/sqrt(d): the scale is folded into the
weights at training. Parameter names and config keys are transformers' `T5EncoderModel`/`T5Config`.

fp16: real T5 checkpoints overflow fp16 in the residual stream (FFN outputs above 65504); as
transformers does, after each sub-block in fp16 the stream is clamped to +-(65504 - 1000) when it
holds an Inf (+-65504 otherwise). bf16 or fp32 needs no clamp.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm_rt.errors import ConfigError

# transformers T5Config fields that are decoder-only, training-only or metadata.
_IGNORED = {
    "num_decoder_layers", "decoder_start_token_id", "eos_token_id", "pad_token_id", "dropout_rate",
    "initializer_factor", "n_positions", "output_past", "tie_word_embeddings", "use_cache", "model_type",
    "architectures", "torch_dtype", "dtype", "transformers_version", "is_encoder_decoder", "is_gated_act",
    "classifier_dropout", "task_specific_params", "_name_or_path", "gradient_checkpointing", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "is_decoder", "scale_decoder_outputs",
}
_ACTS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class T5Config:
    """transformers' `T5Config` (text_encoder_2/config.json), encoder fields only."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # v1.1; "relu" is the original T5's plain FFN
    dense_act_fn: str | None = None  # derived from feed_forward_proj when absent, as transformers

    def __post_init__(self):
        gated = self.feed_forward_proj.startswith("gated-")
        act = self.dense_act_fn or self.feed_forward_proj.split("-")[-1]
        if act == "gelu" and gated:
            act = "gelu_new"  # transformers' legacy mapping of "gated-gelu"
        if act not in _ACTS and act != "relu":
            raise ConfigError(f"T5Config: activation {act!r} is not supported; use gated-gelu or relu.")
        object.__setattr__(self, "dense_act_fn", act)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> T5Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k not in _IGNORED and not k.startswith("_"))
        if unknown:
            warnings.warn(f"T5 config: unknown key(s) {unknown} (ignored).", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", **dataclasses.asdict(self)}

    @staticmethod
    def from_name(name: str) -> T5Config:
        if name not in T5_PRESETS:
            raise ConfigError(f"unknown T5 preset {name!r}; choose one of {', '.join(T5_PRESETS)}.")
        return T5_PRESETS[name]


T5_PRESETS: dict[str, T5Config] = {
    "t5-tiny": T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
    # google/t5-v1_1-xxl, FLUX.1's text_encoder_2 (4.7B parameters).
    "t5-v1_1-xxl": T5Config(),
}


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5Block clamp: keep an fp16 stream finite (a no-op in other dtypes)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; statistics in fp32, then cast to the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (B, M, 1) fp32: fp16 x**2 overflows
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half for each sign; exact up to num_buckets/4, log-spaced to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.config = config
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def compute_bias(self, length: int, device) -> torch.Tensor:
        """(1, H, M, M) bias from the learned table, indexed by bucket(key pos - query pos)."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )  # (M, M)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, M, M)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, M, D), bias (B or 1, H, M, M) additive (position bias + key padding mask)."""
        q, k, v = (f(x).unflatten(-1, (self.config.num_heads, -1)).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) + bias.to(q.dtype)  # (B, H, M, M), no 1/sqrt(d) scale
        probs = scores.float().softmax(dim=-1).to(v.dtype)  # softmax in fp32
        return self.o((probs @ v).transpose(1, 2).flatten(2))  # (B, M, D)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """wo(act(wi_0 x) * wi_1 x); the plain FFN (`wi`) when the config is not gated."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        act = config.dense_act_fn
        self.act = F.relu if act == "relu" else (lambda h: F.gelu(h, approximate=_ACTS[act]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, M, d_ff)
        return self.wo(h.to(self.wo.weight.dtype))  # transformers may keep wo in fp32: follow its dtype


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens  # tied to the model's `shared`
        self.block = nn.ModuleList([T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """input_ids (B, M) [, attention_mask (B, M), 1 = token] -> last hidden states (B, M, d_model).

    FluxPipeline passes no attention mask (padding tokens are attended to); pass one to match
    a pipeline that does. state_dict() holds both `shared.weight` and `encoder.embed_tokens.weight`
    (one tensor); `tie_embedding_keys` fills whichever a checkpoint left out.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.shared(input_ids)  # (B, M, D)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.compute_bias(input_ids.shape[1], x.device)  # (1, H, M, M), shared by every block
        if attention_mask is not None:
            neg = torch.finfo(x.dtype).min
            bias = bias + torch.where(attention_mask.bool(), 0.0, neg)[:, None, None, :].to(bias.dtype)  # (B, H, M, M)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def to_inference_dtype(model: T5EncoderModel, dtype: torch.dtype) -> T5EncoderModel:
    """Cast for inference as transformers loads T5 (`_keep_in_fp32_modules = ["wo"]`): in fp16 the
    FFN output projections stay fp32, so their outputs (the ones that overflow fp16 on real
    checkpoints) and the residual stream after them are fp32; the clamp covers the rest."""
    model.to(dtype)
    if dtype == torch.float16:
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    return model


def tie_embedding_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A T5 state dict with both tied embedding keys (checkpoints may store only one of them)."""
    keys = ("shared.weight", "encoder.embed_tokens.weight")
    present = [k for k in keys if k in state_dict]
    if len(present) == 1:
        state_dict = {**state_dict, keys[1 - keys.index(present[0])]: state_dict[present[0]]}
    return state_dict


class T5Tokenizer:
    """T5 (sentencepiece Unigram) tokenization from a `tokenizer.json` with the `tokenizers` library.

    ids equal transformers' `T5TokenizerFast(tokenizer_file=...)(texts, padding="max_length",
    max_length=N, truncation=True)`, which is how FluxPipeline calls tokenizer_2: the text's
    pieces, truncated to N - 1, then `</s>`, then `<pad>` up to N. The file's own normalizer,
    pre-tokenizer and post-processor are used as written (a hub T5 tokenizer.json carries them).
    """

    def __init__(self, tokenizer, max_length: int, pad_token: str = "<pad>", eos_token: str = "</s>"):
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = tokenizer.token_to_id(pad_token)
        self.eos_token_id = tokenizer.token_to_id(eos_token)
        if self.pad_token_id is None or self.eos_token_id is None:
            from ldm_rt.errors import ModelDirError

            raise ModelDirError(f"T5 tokenizer: {pad_token!r} or {eos_token!r} is not in the vocabulary.")
        tokenizer.no_padding()
        tokenizer.no_truncation()

    @classmethod
    def from_file(cls, path, max_length: int) -> T5Tokenizer:
        """From tokenizer_2/tokenizer.json; a missing or unreadable file is a ModelDirError."""
        from pathlib import Path

        from tokenizers import Tokenizer

        from ldm_rt.errors import ModelDirError

        path = Path(path)
        if not path.is_file():
            raise ModelDirError(f"T5 tokenizer file {path} does not exist; a FluxPipeline directory needs tokenizer_2/tokenizer.json.")
        try:
            return cls(Tokenizer.from_file(str(path)), max_length)
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ModelDirError(f"T5 tokenizer file {path} is not a readable tokenizer.json ({exc}).") from None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, folder) -> None:
        """Write folder/tokenizer.json (+ the tokenizer_config.json and special_tokens_map.json that
        transformers' `T5TokenizerFast.from_pretrained` reads); `from_file` reads it back."""
        import json
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / "tokenizer.json"))
        eos, pad = self._tokenizer.id_to_token(self.eos_token_id), self._tokenizer.id_to_token(self.pad_token_id)
        unk = "<unk>" if self._tokenizer.token_to_id("<unk>") is not None else None
        special = {"eos_token": eos, "pad_token": pad, **({"unk_token": unk} if unk else {})}
        config = {"tokenizer_class": "T5Tokenizer", "model_max_length": self.max_length, "extra_ids": 0, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    def __call__(self, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        """texts -> input_ids (B, max_length) int64 (`max_length` None: the tokenizer's own)."""
        n = self.max_length if max_length is None else max_length
        rows = []
        for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False):
            ids = enc.ids[: n - 1] + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
