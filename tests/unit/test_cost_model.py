"""The placement cost model against counts done by hand, and its choice."""
import pytest

from mole_ds.parallel import cost_model as cm

LINK = cm.Link(alpha_s=1e-4, beta_Bps=1e9)


def _w(**kw):
    base = dict(tokens_per_rank=128, hidden=64, intermediate=128, layers=2, rank=8, num_experts=4, world_size=2,
                zero_stage=3, param_bytes=4, optim_bytes_per_param=8, persistence_threshold=0)
    return cm.Workload(**{**base, **kw})


# Expert elements per layer at E=4: 4 * (8*64 + 128*8 + 8*64 + 128*8 + 8*128 + 64*8) = 18432; 2 layers: 36864.
TOTAL = 36864


def test_expert_parallel_moves_tokens_only():
    c = cm.placement_cost(_w(), 2, LINK)
    # Half of the 128 rows leave the rank, per layer: hidden out + hidden back, fp32; backward the same.
    assert c.a2a_bytes_fwd == 2 * 64 * (64 + 64) * 4 == c.a2a_bytes_bwd
    assert c.a2a_calls == 2 * 5
    # ep_size = world: every expert tensor lives on one rank; ZeRO moves none of them.
    assert c.param_gather_bytes == c.grad_reduce_bytes == c.gather_calls == 0
    assert c.comm_s == pytest.approx(10 * 1e-4 + 2 * 65536 / 1e9)
    # Weighted routing sends one more column on the way out; top-2 sends twice the rows.
    assert cm.placement_cost(_w(weighted_rows=True), 2, LINK).a2a_bytes_fwd == 2 * 64 * (65 + 64) * 4
    assert cm.placement_cost(_w(top_k=2), 2, LINK).a2a_bytes_fwd == 2 * c.a2a_bytes_fwd


def test_replicated_zero3_moves_parameters():
    c = cm.placement_cost(_w(), 1, LINK)
    assert c.a2a_bytes_fwd == c.a2a_calls == 0
    assert c.param_gather_bytes == 2 * TOTAL * 4 / 2  # gathered for forward and backward, half from the peer
    assert c.grad_reduce_bytes == TOTAL * 4 / 2
    assert c.gather_calls == 2 * 2
    # Persistent tensors are gathered once per step (after the optimizer), not per micro-step.
    p = cm.placement_cost(_w(persistence_threshold=10**6, micro_steps=4), 1, LINK)
    assert p.param_gather_bytes == TOTAL * 4 / 2 and p.gather_calls == 0 and p.grad_reduce_bytes == 4 * TOTAL * 4 / 2


def test_memory_per_rank():
    rep, ep = (cm.placement_cost(_w(zero_stage=s), p, LINK) for s, p in ((2, 1), (2, 2)))
    # ZeRO partitions optimizer states in every placement: EP does not shrink them further.
    assert rep.expert_optim_bytes_per_rank == ep.expert_optim_bytes_per_rank == TOTAL * 8 / 2
    # ZeRO-2 keeps a full parameter copy of the experts a rank runs: E with replication, E/P with EP.
    assert rep.expert_param_bytes_per_rank == TOTAL * 4 and ep.expert_param_bytes_per_rank == TOTAL * 4 / 2
    z3 = cm.placement_cost(_w(), 1, LINK)
    assert z3.expert_param_bytes_per_rank == TOTAL * 4 / 2 and z3.gather_buffer_bytes == TOTAL * 4 / 2


def test_choice_is_the_cheapest_and_flips_with_the_workload():
    few_tokens_many_experts = _w(num_experts=256, tokens_per_rank=64)
    chosen, costs = cm.choose_ep_size(few_tokens_many_experts, LINK)
    assert chosen == min(costs, key=lambda c: c.comm_s).ep_size == 2
    many_tokens_few_experts = _w(num_experts=2, tokens_per_rank=65536, persistence_threshold=10**6)
    assert cm.choose_ep_size(many_tokens_few_experts, LINK)[0] == 1
    assert [c.ep_size for c in costs] == [1, 2]
    assert cm.candidate_ep_sizes(6, 4) == [1, 2]
    assert "<- chosen" in cm.format_table(few_tokens_many_experts, costs, chosen, LINK)


def test_inter_node_traffic_uses_the_inter_node_link():
    link = cm.Link(alpha_s=0.0, beta_Bps=100e9, beta_inter_Bps=10e9)
    w = _w(world_size=16, ranks_per_node=8, num_experts=16, tokens_per_rank=4096)
    within, across = cm.placement_cost(w, 8, link), cm.placement_cost(w, 16, link)
    # ep 16 spans both nodes: its token traffic goes at the inter-node rate, and no expert tensor is shared.
    assert across.param_gather_bytes == across.grad_reduce_bytes == 0
    assert across.comm_s == pytest.approx((across.a2a_bytes_fwd + across.a2a_bytes_bwd) / 10e9)
    # ep 8 keeps tokens inside a node (fast link), but its expert-data-parallel pairs (rank i, i + 8) straddle
    # the nodes, so the experts' ZeRO traffic goes at the inter-node rate.
    zero = within.param_gather_bytes + within.grad_reduce_bytes
    assert within.comm_s == pytest.approx((within.a2a_bytes_fwd + within.a2a_bytes_bwd) / 100e9 + zero / 10e9)


def test_presets():
    assert cm.Link.preset("h100_nvlink_ib400").beta_inter_Bps == 40e9
    with pytest.raises(ValueError, match=r"link preset \('x'\) must be one of"):
        cm.Link.preset("x")


@pytest.mark.parametrize("stage,bf16,expected", [(0, False, 8), (0, True, 12), (2, False, 12), (3, False, 12),
                                                 (3, True, 12)])
def test_optimizer_bytes_per_param_follow_what_deepspeed_keeps(stage, bf16, expected):
    # Any ZeRO stage keeps an fp32 weight partition next to Adam's two moments, fp32 training included
    # (deepspeed_compat.optimizer_state_bytes counts it; tools/bench_ep.py measures 12 B/param).
    from mole_ds import MoLEConfig

    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    w = cm.workload_from({"hidden": 64, "intermediate": 128, "layers": 2}, MoLEConfig(num_experts=4, rank=8), ds,
                         world_size=2, seq_len=64)
    assert w.optim_bytes_per_param == expected and w.param_bytes == (2 if bf16 else 4)
    assert w.tokens_per_rank == 128 and w.zero_stage == stage
