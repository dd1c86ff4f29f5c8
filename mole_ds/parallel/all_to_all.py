"""Autograd all-to-all with uneven splits (dropless: any number of rows to any rank)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        # The gradient travels the same routes backwards: what I received I send back to its owner.
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Send ``in_splits[r]`` consecutive rows of ``x`` to rank r of ``group``; receive ``out_splits[r]`` from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all of a (ranks, n) int64 count matrix: row r goes to rank r; returns what each rank sent me."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv
