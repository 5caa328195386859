"""CLIP text transformer: the reference text encoder.

Token + learned position embeddings, pre-LN causal self-attention blocks with a quick-GELU
(or GELU) MLP, a final LayerNorm; the pooled vector is the hidden state at the EOS token.
Parameter names are those of transformers' `CLIPTextModel` (`text_model.embeddings...`,
`text_model.encoder.layers.{i}...`, `text_model.final_layer_norm`), so published CLIP weights
load without renaming; `text_encoder_state_dict_from_file` accepts both key spellings.

CLIP attention is causal and not a swap point: at M = 77 tokens its score matrix is 77 x 77
per head, too small to be worth a kernel, so it is written out here rather than routed
through `ldm_rt.ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_rt.configs import TextEncoderConfig
from ldm_rt.errors import InputError
from ldm_rt.weights import load_strict

PREFIX = "text_model."
# Top-level submodules of the text transformer; a checkpoint key starting with one of these
# (transformers 5.x spelling) gets PREFIX added.
_SUBMODULES = ("embeddings.", "encoder.", "final_layer_norm.")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose statistics are computed in fp32 (fp16 overflows in the x**2 sums);
    the result is cast back to the input dtype. Same parameters (`weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # gelu: exact (erf), as transformers' "gelu"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q, k, v (B, H, M, D) -> (B, H, M, D).

    Token i attends to tokens 0..i. Scores and softmax in fp32 whatever the input dtype
    (fp16 `exp` overflows for large logits); the result is cast back.
    """
    m = q.shape[-2]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, M, M)
    future = torch.ones(m, m, dtype=torch.bool, device=q.device).triu(1)  # (M, M), True above the diagonal
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions are made here, not kept as a buffer, so no `position_ids` key is saved.
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)  # (M,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, M, D)


class CLIPAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, M, D) -> (B, H, M, D/H)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = causal_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, M, D)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, limit = input_ids.shape[-1], self.config.max_position_embeddings
        if m > limit:
            raise InputError(
                f"text encoder got {m} tokens but has only {limit} positions; "
                f"tokenize with max_length <= {limit}."
            )
        hidden = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))  # (B, M, D)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.eos_positions(input_ids)]
        return hidden, pooled  # (B, M, D), (B, D)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token per row (B,), as transformers' CLIPTextModel picks it."""
        ids = input_ids.to(torch.int32)  # argmax on int64 is not in ONNX opset 14
        if self.config.eos_token_id == 2:
            # Configs written before transformers PR #24773 carry eos_token_id 2; for them the
            # EOS is the largest id in the row (49407 in CLIP's vocab), as in OpenAI's code.
            return ids.argmax(dim=-1)
        # The first EOS: padding may use the EOS id too, and argmax returns the first maximum.
        return (ids == self.config.eos_token_id).to(torch.int32).argmax(dim=-1)


class CLIPTextModel(nn.Module):
    """CLIP text encoder: input_ids (B, M) -> (last_hidden_state (B, M, D), pooled (B, D))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model(input_ids)


def text_encoder_state_dict_from_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise a CLIP text-encoder checkpoint to this module's keys (`text_model.` prefix).

    Two spellings exist. Published checkpoints (and anything saved by transformers 4.x) use
    `text_model.embeddings.token_embedding.weight`, ... . transformers 5.x dropped the
    `text_model` wrapper from `CLIPTextModel`: in 5.23 both `state_dict()` and
    `save_pretrained` (model.safetensors) write `embeddings.token_embedding.weight`,
    `encoder.layers.0.self_attn.q_proj.weight`, `final_layer_norm.weight`, ... (it strips the
    prefix on load with a `PrefixChange(prefix_to_remove="text_model")` rule). Keys of the
    second kind get the prefix added; any stored `position_ids` buffer (transformers < 4.31
    saved one) is dropped. Other keys are passed through unchanged, so `load_strict` names them.
    """
    out = {}
    for key, value in sd.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key.startswith(_SUBMODULES):
            key = PREFIX + key
        out[key] = value
    return out


def load_text_encoder(model: CLIPTextModel, sd: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint (either key spelling) into `model`; any mismatch is a WeightsError."""
    load_strict(model, text_encoder_state_dict_from_file(sd), "text_encoder")
