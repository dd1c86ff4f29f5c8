"""Plain LoRA on a frozen linear layer (used for attention q/k/v/o)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """``base_layer(x) + (alpha/r) * B(A(dropout(x)))``: wraps the frozen Linear and calls it, as PEFT does.

    The base stays a submodule (``q_proj.base_layer.weight`` in the state dict, PEFT's key), so whatever the base
    layer does (a quantized Linear, ZeRO-3's gather hooks) keeps working; the adapter adds ``lora_A`` (r, in) and
    ``lora_B`` (out, r), PEFT's shapes and init (B = 0, so a fresh adapter changes nothing).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(alpha) / rank

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (code that inspects ``proj.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        delta = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return base + self.scaling * delta.to(base.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"
