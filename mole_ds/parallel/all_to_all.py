"""Autograd all-to-all with uneven splits (dropless: any number of rows to any rank), with byte accounting."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """What the row all-to-alls of one dispatcher moved since the last reset.

    Bytes count only rows sent to *other* ranks (a rank's rows to itself never touch the network); calls count
    every row all-to-all (forward: dispatch + combine; backward: their gradients). ``meta_calls`` counts the
    small all-to-alls of per-expert row counts that size the row all-to-alls. Under activation checkpointing
    the forward of a layer runs again during backward: while ``recomputing`` is set (by
    ``mole_ds.parallel.activation_checkpoint``) its row all-to-alls count as ``recompute_*``, real traffic
    reported on its own, so ``fwd_*`` stays one forward's worth.
    """

    fwd_bytes: int = 0
    bwd_bytes: int = 0
    fwd_calls: int = 0
    bwd_calls: int = 0
    fwd_rows: int = 0
    """Rows sent to other ranks in forward row all-to-alls."""
    meta_calls: int = 0
    recompute_bytes: int = 0
    recompute_calls: int = 0
    recomputing: bool = False
    """Set while a checkpointed layer is being recomputed (not a counter: reset() leaves it)."""

    COUNTERS = ("fwd_bytes", "bwd_bytes", "fwd_calls", "bwd_calls", "fwd_rows", "meta_calls", "recompute_bytes",
                "recompute_calls")

    def reset(self) -> None:
        for f in self.COUNTERS:
            setattr(self, f, 0)


def _remote(splits: list[int], me: int) -> int:
    return sum(splits) - splits[me]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, me: int,
                stats: CommStats | None) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.me, ctx.stats = (out_splits, in_splits), group, me, stats
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        if stats is not None:
            row = math.prod(x.shape[1:]) * x.element_size()
            if stats.recomputing:
                stats.recompute_calls += 1
                stats.recompute_bytes += _remote(in_splits, me) * row
            else:
                stats.fwd_calls += 1
                stats.fwd_rows += _remote(in_splits, me)
                stats.fwd_bytes += _remote(in_splits, me) * row
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        # The gradient travels the same routes backwards: what I received I send back to its owner.
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        if ctx.stats is not None:
            row = math.prod(grad.shape[1:]) * grad.element_size()
            ctx.stats.bwd_calls += 1
            ctx.stats.bwd_bytes += _remote(out_splits, ctx.me) * row
        return grad_in, None, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, me: int | None = None,
               stats: CommStats | None = None) -> torch.Tensor:
    """Send ``in_splits[r]`` consecutive rows of ``x`` to rank r of ``group``; receive ``out_splits[r]`` from it.
    ``me`` is this rank's index in the group (for byte accounting in ``stats``)."""
    me = dist.get_rank(group) if me is None else me
    return _AllToAll.apply(x, out_splits, in_splits, group, me, stats)


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all of a (ranks, n) int64 count matrix: row r goes to rank r; returns what each rank sent me."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv
