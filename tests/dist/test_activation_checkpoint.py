"""Activation checkpointing on real DeepSpeed ranks: the checkpointed run equals the same run without it
(losses with aux loss, routing counts, final weights after 4 Adam steps, so every LoRA/router gradient), with
LoRA dropout on, under ZeRO-3 and ZeRO-2, with expert parallelism and without; its expert all-to-alls are the
forward's in number and bytes, the recompute's traffic is counted apart, and a skew onto one expert (one rank
sends every row, the other none) neither hangs nor changes the result. The single-process cases for every
routing mode and top_k are tests/unit/test_activation_checkpoint.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support import worker_losses

pytestmark = pytest.mark.dist

CASES = {  # name: (ranks, worker args); each runs with and without --grad-ckpt
    "z3_ep2_weighted_top2": (2, ("--stage", "3", "--ep", "2", "--routing", "weighted", "--top-k", "2",
                                 "--dropout", "0.1")),
    "z2_ep2_st": (2, ("--stage", "2", "--ep", "2", "--routing", "st", "--dropout", "0.1")),
    "z3_ep1_dense": (2, ("--stage", "3", "--ep", "1", "--routing", "dense", "--dropout", "0.1")),
}


@pytest.fixture(scope="module")
def pairs(worker_run):
    out = {}
    for name, (n, args) in CASES.items():
        out[name] = (worker_run(n, *args), worker_run(n, *args, "--grad-ckpt"))
    # all tokens to expert 3 (rank 1's): rank 0 sends every row to rank 1, rank 1 sends none to rank 0. The
    # run without checkpointing is test_expert_parallel's (the same launch, shared through worker_run).
    forced = ("--stage", "3", "--ep", "2", "--routing", "sparse", "--force-expert", "3")
    out["z3_ep2_forced"] = (worker_run(2, *forced), worker_run(2, *forced, "--grad-ckpt"))
    return out


def _comm(run, world=2):
    return [json.loads((run / f"comm_rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("name", [*CASES, "z3_ep2_forced"])
def test_checkpointed_run_equals_the_plain_run(pairs, name):
    plain, ckpt = pairs[name]
    a, b = worker_losses(plain), worker_losses(ckpt)
    assert len(a["losses"]) == len(b["losses"]) == 4
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=0, atol=1e-5)
    assert b["counts"] == a["counts"]  # routing statistics of the real forward, counted once
    sa, sb = load_file(str(plain / "final.safetensors")), load_file(str(ckpt / "final.safetensors"))
    assert sa.keys() == sb.keys() and any(".router." in k for k in sa) and any(".experts." in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["z3_ep2_weighted_top2", "z2_ep2_st", "z3_ep2_forced"])
def test_recompute_traffic_is_counted_apart(pairs, name):
    plain, ckpt = pairs[name]
    for p, c in zip(_comm(plain), _comm(ckpt)):
        # forward and backward: exactly the plain run's calls and bytes
        for k in ("fwd_calls", "fwd_bytes", "fwd_rows", "bwd_calls", "bwd_bytes"):
            assert c[k] == p[k], k
        assert p["recompute_calls"] == p["recompute_bytes"] == 0
        # the recompute dispatches and combines every layer again: the forward's traffic once more
        assert c["recompute_calls"] == c["fwd_calls"] == 2 * c["layers"]
        assert c["recompute_bytes"] == c["fwd_bytes"]
    if name == "z3_ep2_forced":  # the skew the case is about: every token on expert 3, ep rank 1's
        counts = torch.tensor(worker_losses(ckpt)["counts"])
        assert counts[:, 3].sum() == counts.sum() > 0
