"""MegaBlocks backend (CUDA only): MegaBlocks permutation ops + grouped GEMM for the LoRA products.

MegaBlocks cannot even be imported without its CUDA build, so it is an optional extra
(``pip install -e .[gpu]``, see README) probed once; asking for it when it is absent is a clear error.
"""
from __future__ import annotations

import functools
import math

import torch

from .base import Backend, Plan

_INSTALL_HINT = (
    "install the optional GPU extra on a CUDA machine: pip install --no-build-isolation -e '.[gpu]' "
    "(MegaBlocks needs CUDA; use mole.backend='torch' elsewhere)"
)


@functools.lru_cache(maxsize=1)
def megablocks_available() -> tuple[bool, str]:
    """(available, reason) - probed once per process."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        import grouped_gemm.ops  # noqa: F401
        import megablocks.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA extension that fails to load
        return False, f"megablocks/grouped_gemm cannot be imported ({type(exc).__name__}: {exc})"
    return True, "ok"


class MegaBlocksBackend(Backend):
    name = "megablocks"

    def __init__(self) -> None:
        ok, reason = megablocks_available()
        if not ok:
            raise RuntimeError(f"mole.backend ('megablocks') is not usable: {reason}; {_INSTALL_HINT}")
        import grouped_gemm.ops as gg_ops
        import megablocks.ops as mb_ops

        self._mb = mb_ops
        self._gmm = gg_ops.gmm

    def plan(self, expert_idx_TJ, num_experts):
        # 1. sort the flattened (token, slot) choices by expert with MegaBlocks' radix sort;
        # 2. histogram -> rows per expert, inclusive cumsum -> bin ends;
        # 3. keep order_R / token_R too, so an outer expert-parallel dispatcher can use the plan.
        mb = self._mb
        J = expert_idx_TJ.shape[1]
        flat_R = expert_idx_TJ.reshape(-1).int()
        end_bit = max(int(math.ceil(math.log2(num_experts))), 1)
        bin_ids, indices = mb.sort(flat_R, end_bit)
        counts = mb.histogram(flat_R, num_experts)
        bins = mb.inclusive_cumsum(counts, 0)
        bins = bins.view(1) if bins.dim() == 0 else bins
        order_R = indices.long()
        return Plan(num_experts, J, order_R, order_R // J, counts.long(), extra=(indices, bin_ids, bins))

    def gather(self, x_TD, plan):
        indices, bin_ids, bins = plan.extra
        return self._mb.gather(x_TD, indices, bin_ids, bins, plan.J)

    def grouped_lora(self, x_RD, counts_E, A_ErI, B_EOr):
        batch_sizes = counts_E.to("cpu", torch.int64)  # grouped_gemm wants host-side sizes
        h_Rr = self._gmm(x_RD, A_ErI, batch_sizes, trans_b=True)
        return self._gmm(h_Rr, B_EOr, batch_sizes, trans_b=True)

    def scatter(self, y_RO, plan, weight_TJ, num_tokens):
        # MegaBlocks indexes the weights by flattened (token, slot), scales rows when given, sums the J rows.
        indices, bin_ids, bins = plan.extra
        w = None if weight_TJ is None else weight_TJ.reshape(-1).to(y_RO.dtype)
        return self._mb.scatter(y_RO, indices, bin_ids, w, bins, plan.J)
