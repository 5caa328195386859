"""Precision is one enum passed down; nothing else calls `.half()`."""

from __future__ import annotations

import enum

import torch

from ldm_rt.errors import InputError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @classmethod
    def parse(cls, value: str | torch.dtype | Precision | None) -> Precision | None:
        if value is None or isinstance(value, Precision):
            return value
        if isinstance(value, torch.dtype):
            for p in cls:
                if p.dtype == value:
                    return p
            raise InputError(f"dtype {value} is not supported; use fp32, fp16 or bf16.")
        aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
        key = aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(key)
        except ValueError:
            raise InputError(f"dtype {value!r} is not supported; use fp32, fp16 or bf16.") from None

    @classmethod
    def default_for(cls, device: torch.device) -> Precision:
        """fp32 on CPU, fp16 on CUDA."""
        return cls.FP16 if device.type == "cuda" else cls.FP32
