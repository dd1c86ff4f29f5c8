"""LoRA expert tensors for one MoLE MLP: A/B pairs for gate, up and down projections, stacked over experts."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

PROJECTIONS = ("gate", "up", "down")


class LoRAExperts(nn.Module):
    """E LoRA experts, each with a LoRA on gate_proj, up_proj and down_proj (PEFT's A/B convention).

    ``{p}_A``: (E, r, in_features), ``{p}_B``: (E, out_features, r). A is Kaiming-uniform like PEFT's
    ``lora_A`` (per expert, so fan-in is in_features), B is zero: a freshly built MoLE MLP equals its base.

    Under expert parallelism a rank holds only ``num_experts`` = E / ep_size of them; ``expert_offset`` is
    the global index of its first one. The module holds tensors only: dispatch lives in ``dispatch/``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        rank: int,
        expert_offset: int = 0,
        layer_idx: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.expert_offset = expert_offset
        self.layer_idx = layer_idx
        self.rank = rank
        shapes = {
            "gate": (intermediate_size, hidden_size),
            "up": (intermediate_size, hidden_size),
            "down": (hidden_size, intermediate_size),
        }
        for p, (out_f, in_f) in shapes.items():
            self.register_parameter(f"{p}_A", nn.Parameter(torch.empty(num_experts, rank, in_f, dtype=dtype, device=device)))
            self.register_parameter(f"{p}_B", nn.Parameter(torch.empty(num_experts, out_f, rank, dtype=dtype, device=device)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert's A is drawn from its own generator seeded by (process seed, layer, global expert
        # index): a rank holding experts [o, o + n) builds exactly the slice that a single process would,
        # whatever the ep_size.
        base_seed = torch.initial_seed()
        for j, p in enumerate(PROJECTIONS):
            A, B = self.pair(p)
            with torch.no_grad():
                for e in range(A.shape[0]):
                    g = torch.Generator().manual_seed(
                        (base_seed + 1_000_003 * self.layer_idx + 7919 * (self.expert_offset + e) + j) % (2**63))
                    a = torch.empty(A.shape[1:], dtype=torch.float32)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
                    A[e].copy_(a)
                B.zero_()

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend, projections: tuple[str, ...]) -> list[torch.Tensor]:
        """Unscaled LoRA deltas of ``projections`` (which share the input) for rows grouped by expert:
        ``counts_E[e]`` rows of local expert e, in order.

        The products run inside this module's forward, which is what lets ZeRO-3 gather these tensors (its hooks
        fire on module calls), on every rank in the same order, even for zero rows."""
        return [backend.grouped_lora(x_RD, counts_E, *self.pair(p)) for p in projections]

    def pair(self, proj: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A_ErI, B_EOr) of one projection."""
        return getattr(self, f"{proj}_A"), getattr(self, f"{proj}_B")

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, offset={self.expert_offset}, rank={self.rank}"


def is_expert_name(name: str) -> bool:
    """Whether a parameter (or state-dict key) name is a LoRA expert tensor (``...mlp.experts.<tensor>``): the
    one rule for names, used where no live parameter is at hand (files, state dicts, optimizer groups); for
    live tensors under expert parallelism see ``mole_ds.parallel.deepspeed_compat.is_expert_param``."""
    return ".experts." in name
