"""CLIP tokenizer on the `tokenizers` library (no transformers at runtime).

The pipeline is the one transformers 5.x's `CLIPTokenizer` builds (and its `CLIPConverter`
before it), so ids equal `CLIPTokenizer(...)(texts, padding="max_length", truncation=True,
max_length=N)`:

1. normalise: NFC, collapse every whitespace run to one space, lowercase;
2. pre-tokenise: CLIP's regex (contractions, letter runs, single digits, other symbol runs;
   whitespace dropped), then GPT-2 ByteLevel (bytes -> printable unicode symbols);
3. BPE with `end_of_word_suffix="</w>"`, unknown symbols -> unk (`<|endoftext|>`);
4. `<|startoftext|>` + ids[:N-2] + `<|endoftext|>`, right-padded with the pad token to N.

bos/eos/pad/unk are special tokens matched in the raw text before normalisation, as in
transformers; so with SD2's pad token "!" every "!" in a prompt becomes id 0 rather than "!</w>".
One known difference: transformers honours a `"normalized": true` flag stored with a special
token in tokenizer_config.json / special_tokens_map.json (SD1.x/SD2 folders carry it for some of
them), which makes it also match that token in other letter case (`<|ENDOFTEXT|>`); here
special tokens match only as written.
Like transformers, a model directory's `tokenizer.json` contributes only its vocab and merges:
the pipeline above is always rebuilt.

`strip_punctuation=True` (off by default, so CLIP's ids stay CLIP's) adds one normalisation
step before the whitespace collapse: every character that is not a letter, digit or whitespace
becomes a space, so "A red circle, on the left." tokenises as "a red circle on the left". The
demo model's tokenizer has it (a closed caption vocabulary never shows punctuation); it is
stored in tokenizer_config.json as `ldm_rt_strip_punctuation`, which `from_dir` reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ldm_rt.errors import ModelDirError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# transformers 5.x CLIPTokenizer's split pattern (OpenAI's, plus the two special tokens).
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers writes int(1e30) as model_max_length when a tokenizer has none.
_UNSET_MAX_LENGTH = 10**29
STRIP_PUNCTUATION_KEY = "ldm_rt_strip_punctuation"  # tokenizer_config.json flag (ldm-rt's own)


@dataclass
class TokenizerOutput:
    input_ids: torch.Tensor  # (B, max_length) int64
    attention_mask: torch.Tensor  # (B, max_length) bool, True = a real token (bos..eos)
    truncated: list[bool]  # per text: tokens were dropped to fit max_length


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length (max_length) id rows."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        max_length: int,
        bos_token: str = BOS,
        eos_token: str = EOS,
        pad_token: str = EOS,
        unk_token: str = EOS,
        strip_punctuation: bool = False,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for bos and eos), got {max_length}")
        tok = Tokenizer(
            BPE(
                vocab=dict(vocab),
                merges=[tuple(m) for m in merges],
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD,
                fuse_unk=False,
                unk_token=unk_token,
            )
        )
        steps = [normalizers.NFC()]
        if strip_punctuation:
            steps.append(normalizers.Replace(Regex(r"[^\p{L}\p{N}\s]"), " "))
        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Specials not in the vocab get the next free ids, as transformers adds them.
        specials = list(dict.fromkeys([bos_token, eos_token, pad_token, unk_token]))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.bos_token_id = tok.token_to_id(bos_token)
        self.eos_token_id = tok.token_to_id(eos_token)
        self.pad_token_id = tok.token_to_id(pad_token)
        # Kept so that tokenizer.json is complete for other readers; __call__ adds bos/eos itself.
        tok.post_processor = processors.RobertaProcessing(
            (eos_token, self.eos_token_id), (bos_token, self.bos_token_id), trim_offsets=False,
            add_prefix_space=False,
        )
        self._tokenizer = tok
        self.max_length = max_length
        self.strip_punctuation = strip_punctuation
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token

    # -----------------------------------------------------------------------------------------
    # Construction
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_vocab(
        cls, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int, pad_token: str = EOS,
        strip_punctuation: bool = False,
    ) -> CLIPTokenizer:
        """From a CLIP vocab (`<|startoftext|>`, `<|endoftext|>` included) and its merges."""
        return cls(vocab, merges, max_length, pad_token=pad_token, strip_punctuation=strip_punctuation)

    @classmethod
    def byte_level(
        cls, bos_token_id: int, eos_token_id: int, pad_token_id: int, max_length: int,
        vocab_size: int | None = None,
    ) -> CLIPTokenizer:
        """A valid CLIP-format BPE with no merges, for random-weight models.

        Ids 0..255 are the byte symbols and 256..511 their "</w>" forms (CLIP's own order);
        bos and eos sit at the given ids (>= 512). The pad id may equal eos or bos, be another
        id >= 512 (a "<|pad|>" token), or be < 512 to reuse that byte symbol (SD2 pads with
        "!" = 0). The `tokenizers` BPE accepts the resulting gaps in the id space, so none are
        filled. With `vocab_size`, every id must be below it.
        """
        symbols = sorted(_CLIP_BYTE_RANK, key=_CLIP_BYTE_RANK.__getitem__)  # CLIP's byte order
        vocab = {s: i for i, s in enumerate(symbols + [s + END_OF_WORD for s in symbols])}
        n = len(vocab)  # 512
        if bos_token_id < n or eos_token_id < n or bos_token_id == eos_token_id:
            raise ValueError(
                f"byte_level tokenizer: bos ({bos_token_id}) and eos ({eos_token_id}) must be "
                f"distinct ids >= {n} (0..{n - 1} are byte symbols)"
            )
        ids = (bos_token_id, eos_token_id, pad_token_id)
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(
                f"byte_level tokenizer: special ids {ids} must be < the text encoder's "
                f"vocab_size {vocab_size}"
            )
        vocab[BOS], vocab[EOS] = bos_token_id, eos_token_id
        if pad_token_id == eos_token_id:
            pad_token = EOS
        elif pad_token_id == bos_token_id:
            pad_token = BOS
        elif pad_token_id < n:
            pad_token = next(s for s, i in vocab.items() if i == pad_token_id)
        else:
            pad_token = "<|pad|>"
            vocab[pad_token] = pad_token_id
        return cls(vocab, [], max_length, pad_token=pad_token)

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int | None = None,
                 strip_punctuation: bool | None = None) -> CLIPTokenizer:
        """Load a tokenizer/ folder: tokenizer.json, or vocab.json + merges.txt (CLIP format).

        tokenizer_config.json / special_tokens_map.json, when present, give model_max_length and
        the bos/eos/pad/unk tokens. The length used is the smaller of model_max_length and
        `max_length` (the pipeline passes the text encoder's max_position_embeddings).
        `strip_punctuation` None reads the folder's `ldm_rt_strip_punctuation` flag (default off).
        """
        path = Path(path)
        if not path.is_dir():
            raise ModelDirError(f"tokenizer folder {path} does not exist.")
        if (path / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(path / "tokenizer.json")
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab, merges = BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt"))
        else:
            raise ModelDirError(
                f"tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt; "
                "copy the tokenizer/ folder of the checkpoint there."
            )
        config = _read_json(path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # transformers' legacy order: special_tokens_map.json overrides tokenizer_config.json.
            config.update(_read_json(path / "special_tokens_map.json"))
        tokens = {
            key: _token_content(config.get(f"{key}_token"), default)
            for key, default in (("bos", BOS), ("eos", EOS), ("pad", EOS), ("unk", EOS))
        }
        stored = config.get("model_max_length")
        if not isinstance(stored, int) or stored >= _UNSET_MAX_LENGTH:
            stored = None
        lengths = [n for n in (stored, max_length) if n is not None]
        if not lengths:
            raise ModelDirError(
                f"tokenizer folder {path} sets no model_max_length; pass max_length "
                "(the text encoder's max_position_embeddings)."
            )
        return cls(
            vocab, merges, min(lengths), bos_token=tokens["bos"], eos_token=tokens["eos"],
            pad_token=tokens["pad"], unk_token=tokens["unk"],
            strip_punctuation=config.get(STRIP_PUNCTUATION_KEY) is True if strip_punctuation is None
            else strip_punctuation,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json; `from_dir` reads them back exactly."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        if self.strip_punctuation:
            config[STRIP_PUNCTUATION_KEY] = True
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # -----------------------------------------------------------------------------------------
    # Encoding
    # -----------------------------------------------------------------------------------------

    def __call__(self, texts: str | list[str]) -> TokenizerOutput:
        if isinstance(texts, str):
            texts = [texts]
        n = self.max_length
        ids = torch.full((len(texts), n), self.pad_token_id, dtype=torch.long)  # (B, N)
        mask = torch.zeros((len(texts), n), dtype=torch.bool)  # (B, N)
        truncated = []
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for i, enc in enumerate(encodings):
            body = enc.ids[: n - 2]  # truncation keeps room for bos and eos
            truncated.append(len(enc.ids) > n - 2)
            row = [self.bos_token_id, *body, self.eos_token_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return TokenizerOutput(input_ids=ids, attention_mask=mask, truncated=truncated)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens (for messages such as the truncation warning)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True).replace(END_OF_WORD, " ").strip()

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id, special tokens included."""
        return self._tokenizer.get_vocab()

    @property
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer can produce."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def _clip_byte_symbols() -> dict[str, int]:
    """OpenAI CLIP's bytes_to_unicode() symbols -> their vocab ids (0..255).

    Printable bytes map to themselves and come first; the other bytes map to chr(256 + k).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order = printable + [b for b in range(256) if b not in printable]
    chars, extra = {}, 0
    for b in order:
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {chars[b]: i for i, b in enumerate(order)}


_CLIP_BYTE_RANK = _clip_byte_symbols()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{path} is not valid JSON ({exc}); re-download the tokenizer folder.") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} must hold a JSON object; re-download the tokenizer folder.")
    return data


def _token_content(value, default: str) -> str:
    """A special token as written by transformers: a string or {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a BPE tokenizer.json (merges as "a b" strings or [a, b] pairs)."""
    model = _read_json(path).get("model", {})
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelDirError(f"{path} does not hold a BPE model; a CLIP tokenizer.json is needed.")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], merges
