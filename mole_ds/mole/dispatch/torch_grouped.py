"""Dropless grouped dispatch on torch.nn.functional.grouped_mm (CPU and CUDA, no extra packages)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, scatter_rows, sort_plan


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides. ``contiguous()`` is not enough for grouped_mm, which checks every stride
    for 16-byte alignment: a dimension of size 1 may carry any stride and still count as contiguous (one
    routed row in a decoding step arrives as a [1, I] view with strides (1, 1))."""
    expected, step = [], 1
    for n in reversed(t.shape):
        expected.append(step)
        step *= n
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects non-contiguous upstream gradients (e.g. from expand/sum).
    if t.requires_grad:
        t.register_hook(_row_major)
    return t


def _aligned(n: int, dtype: torch.dtype) -> bool:
    # grouped_mm needs 16-byte aligned strides (bf16: multiples of 8 elements).
    return (n * torch.empty(0, dtype=dtype).element_size()) % 16 == 0


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert times their expert's (I, O) matrix: y[rows of e] = x[rows of e] @ w[e]."""
    if x_RI.shape[0] == 0:
        # An empty product that stays connected to both the rows and the weights: every expert tensor gets a
        # (zero) gradient, and under expert parallelism the backward all-to-all of the (empty) received rows
        # still runs on this rank - skipping it leaves the peers waiting forever.
        return x_RI @ w_EIO[0]
    if not (_aligned(w_EIO.shape[1], x_RI.dtype) and _aligned(w_EIO.shape[2], x_RI.dtype)):
        # Odd feature sizes: per-group matmuls on contiguous slices (still dropless, still no masks).
        outs = [x @ w for x, w in zip(torch.split(x_RI, counts_E.tolist()), w_EIO.unbind(0))]
        return torch.cat(outs, 0)
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    return _contiguous_grad(F.grouped_mm(_row_major(x_RI), w_EIO, offs=offs))


class TorchGroupedBackend(Backend):
    """Sort rows by expert once per layer, run each LoRA factor as one grouped GEMM, scatter back."""

    name = "torch"

    def plan(self, expert_idx_TJ, num_experts):
        return sort_plan(expert_idx_TJ, num_experts)

    def gather(self, x_TD, plan):
        return x_TD.index_select(0, plan.token_R)

    def grouped_lora(self, x_RD, counts_E, A_ErI, B_EOr):
        # (R, I) x (E, I, r) -> (R, r) -> x (E, r, O) -> (R, O); the transposes are views.
        r = A_ErI.shape[1]
        if not _aligned(r, x_RD.dtype):
            # Pad the rank with zero rows of A / zero columns of B: the product is unchanged and the padded
            # gradients are simply dropped by F.pad's backward.
            pad = -r % (16 // x_RD.element_size())
            A_ErI = F.pad(A_ErI, (0, 0, 0, pad))
            B_EOr = F.pad(B_EOr, (0, pad))
        h_Rr = grouped_matmul(x_RD, A_ErI.transpose(1, 2), counts_E)
        return grouped_matmul(h_Rr, B_EOr.transpose(1, 2), counts_E)

    def scatter(self, y_RO, plan, weight_TJ, num_tokens):
        return scatter_rows(y_RO, plan, weight_TJ, num_tokens)
