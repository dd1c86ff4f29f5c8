"""Activation checkpointing (mole_ds.parallel.activation_checkpoint) in one process: the checkpointed model
gives the same loss, aux loss, routing statistics and gradients as the plain one, for every routing mode,
top_k 1 and 2, with dropout on; the recompute really runs and leaves the forward's routing statistics alone.
The multi-rank cases (expert parallelism, ZeRO-2/3) are in tests/dist/test_expert_parallel.py."""
from __future__ import annotations

import copy

import pytest
import torch

from mole_ds import MoLEConfig, aux_losses, mole_layers, patch_model, routing_counts, set_sample_domains
from mole_ds.models.tiny import build_tiny_llava
from mole_ds.parallel import apply_activation_checkpointing
from tests.support import llava_inputs

CASES = [("sparse", 1), ("sparse", 2), ("weighted", 1), ("weighted", 2), ("st", 1), ("st", 2), ("dense", 1),
         ("oracle", 1)]


def _pair(routing: str, top_k: int):
    cfg = MoLEConfig(num_experts=4, top_k=top_k, rank=4, alpha=8.0, dropout=0.1, routing=routing,
                     balance_coef=0.05, z_loss_coef=0.01, train_projector=True)
    plain = build_tiny_llava(seed=0)
    patch_model(plain, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if p.requires_grad and p.ndim > 0:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # B = 0 at init: make every path live
    ckpt = copy.deepcopy(plain)
    assert apply_activation_checkpointing(ckpt) == len(mole_layers(ckpt))  # one MoLE MLP per decoder layer
    return plain.train(), ckpt.train()


def _step(model, inputs):
    torch.manual_seed(123)  # the same dropout masks in both models' forwards
    set_sample_domains(model, torch.tensor([0, 3]))
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    out = model(**inputs, labels=labels)
    parts = aux_losses(model)
    stats = [m.last_stats for m in mole_layers(model)]
    counts = routing_counts(model).clone()
    (out.loss + 0.05 * parts["balance"] + 0.01 * parts["z"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in parts.items()}, counts, grads, stats


@pytest.mark.parametrize("routing,top_k", CASES)
def test_checkpointed_model_equals_plain(routing, top_k):
    plain, ckpt = _pair(routing, top_k)
    inputs = llava_inputs(plain)
    calls = {"plain": 0, "ckpt": 0}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        for m in mole_layers(model):
            m.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    loss_a, aux_a, counts_a, grads_a, _ = _step(plain, inputs)
    loss_b, aux_b, counts_b, grads_b, stats_b = _step(ckpt, inputs)

    n_layers = len(mole_layers(plain))
    assert calls == {"plain": n_layers, "ckpt": 2 * n_layers}  # the recompute ran every MoLE layer once more
    # ... and left the statistics of the real forward in place (the same objects as before backward)
    assert [m.last_stats for m in mole_layers(ckpt)] == stats_b
    assert all(s is t for s, t in zip((m.last_stats for m in mole_layers(ckpt)), stats_b))
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    for k in aux_a:
        torch.testing.assert_close(aux_b[k], aux_a[k], rtol=0, atol=1e-6)
    assert torch.equal(counts_b, counts_a)
    assert grads_a.keys() == grads_b.keys() and any(".router." in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_router_gets_gradient_only_where_the_mode_gives_it():
    """A guard on the comparison above: with sparse routing the router learns from the aux loss alone, with
    'st' from the task too; both paths survive checkpointing (non-zero, equal to the plain model's)."""
    for routing in ("sparse", "st"):
        plain, ckpt = _pair(routing, 1)
        inputs = llava_inputs(plain)
        _, _, _, ga, _ = _step(plain, inputs)
        _, _, _, gb, _ = _step(ckpt, inputs)
        router = [n for n in ga if n.endswith("router.weight")]
        assert router and all(ga[n].abs().sum() > 0 for n in router)
        for n in router:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6)


def test_full_training_of_an_unpatched_base_checkpoints_too():
    """model.train_base trains the LLM itself (no MoLE layers): checkpointing applies and changes nothing."""
    plain = build_tiny_llava(seed=0).train()
    ckpt = copy.deepcopy(plain)
    assert apply_activation_checkpointing(ckpt) == plain.config.text_config.num_hidden_layers
    inputs = llava_inputs(plain)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(0)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
