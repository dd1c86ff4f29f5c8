"""Balance and z losses against hand computation; pad tokens excluded; where router gradients come from."""
import math

import pytest
import torch

import mole_ds
from mole_ds.mole.losses import mole_balance_loss, routing_stats, switch_balance_loss, z_loss
from tests.unit.helpers import make_mlp_pair

# Two layers, two samples of three tokens, E = 2; sample 1's last token is padding.
LOGITS = [
    torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5], [3.0, 0.0], [0.5, 0.0], [9.0, -9.0]]),
    torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5], [0.2, 0.0], [0.0, 3.0], [-9.0, 9.0]]),
]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _stats(k=1):
    out = []
    for lg in LOGITS:
        p = lg.softmax(-1)
        out.append(routing_stats(lg, p, p.topk(k, -1).indices, MASK))
    return out


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _hand_mole():
    # Per sample: P_e = mean over (layer, real token) of p_e; f_e = share of those routed to e; sum_e P_e f_e.
    per_sample = []
    for b in range(2):
        toks = [(l, t) for l in range(2) for t in range(3) if MASK[b, t]]
        P = [0.0, 0.0]
        f = [0.0, 0.0]
        for l, t in toks:
            p = _softmax(LOGITS[l][b * 3 + t].tolist())
            for e in range(2):
                P[e] += p[e] / len(toks)
            f[max(range(2), key=lambda e: p[e])] += 1 / len(toks)
        per_sample.append(sum(P[e] * f[e] for e in range(2)))
    return sum(per_sample) / 2


def _hand_switch():
    vals = []
    for l in range(2):
        toks = [b * 3 + t for b in range(2) for t in range(3) if MASK[b, t]]
        P = [0.0, 0.0]
        f = [0.0, 0.0]
        for i in toks:
            p = _softmax(LOGITS[l][i].tolist())
            for e in range(2):
                P[e] += p[e] / len(toks)
            f[max(range(2), key=lambda e: p[e])] += 1 / len(toks)
        vals.append(2 * sum(P[e] * f[e] for e in range(2)))
    return sum(vals) / 2


def _hand_z():
    vals = []
    for l in range(2):
        toks = [b * 3 + t for b in range(2) for t in range(3) if MASK[b, t]]
        vals.append(sum(math.log(sum(math.exp(v) for v in LOGITS[l][i].tolist())) ** 2 for i in toks) / len(toks))
    return sum(vals) / 2


def test_losses_match_hand_computation():
    s = _stats()
    assert mole_balance_loss(s).item() == pytest.approx(_hand_mole(), rel=1e-6)
    assert switch_balance_loss(s).item() == pytest.approx(_hand_switch(), rel=1e-6)
    assert z_loss(s).item() == pytest.approx(_hand_z(), rel=1e-6)


def test_pad_tokens_do_not_count():
    # The pad token has extreme logits (+-9): were it counted, every loss would move.
    s = _stats()
    changed = [lg.clone() for lg in LOGITS]
    for lg in changed:
        lg[5] = torch.tensor([-40.0, 40.0])
    s2 = [routing_stats(lg, lg.softmax(-1), lg.softmax(-1).topk(1, -1).indices, MASK) for lg in changed]
    for fn in (mole_balance_loss, switch_balance_loss, z_loss):
        assert fn(s).item() == pytest.approx(fn(s2).item(), rel=1e-7)
    # ... while a real token's logits do move them.
    changed[0][0] = torch.tensor([-40.0, 40.0])
    s3 = [routing_stats(lg, lg.softmax(-1), lg.softmax(-1).topk(1, -1).indices, MASK) for lg in changed]
    assert mole_balance_loss(s3).item() != pytest.approx(mole_balance_loss(s).item(), rel=1e-3)


def test_uniform_routing_reference_values():
    # Uniform probabilities and perfectly balanced choices: mole -> 1/E, switch -> 1.
    E, T = 4, 8
    lg = torch.zeros(T, E)
    chosen = torch.arange(T).remainder(E)[:, None]
    s = [routing_stats(lg, lg.softmax(-1), chosen, torch.ones(1, T))]
    assert mole_balance_loss(s).item() == pytest.approx(1 / E)
    assert switch_balance_loss(s).item() == pytest.approx(1.0)


def test_aux_loss_weights_and_modes():
    fast, _ = make_mlp_pair(4, 1, "sparse", seed=1)
    fast.config.z_loss_coef = 0.5
    fast(torch.randn(2, 5, 32))
    parts = mole_ds.aux_losses(fast)
    expected = 0.01 * parts["balance"] + 0.5 * parts["z"]
    assert mole_ds.aux_loss(fast).item() == pytest.approx(expected.item())
    fast.config.balance_loss = "none"
    assert mole_ds.aux_losses(fast)["balance"].item() == 0.0
    with pytest.raises(ValueError, match="no MoLE layers"):
        mole_ds.aux_loss(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("routing,expect_grad", [("sparse", False), ("weighted", True), ("dense", True)])
def test_router_gradient_from_task_loss(routing, expect_grad):
    mlp, _ = make_mlp_pair(4, 1, routing, seed=2)
    y = mlp(torch.randn(2, 7, 32))
    (y * torch.randn_like(y)).sum().backward()  # task loss only, no aux loss
    g = mlp.router.weight.grad
    if expect_grad:
        assert g is not None and g.abs().sum() > 0
    else:
        assert g is None or g.abs().sum() == 0
    # The aux loss alone always reaches the router.
    mlp.zero_grad()
    mlp(torch.randn(2, 7, 32))
    mole_ds.aux_loss(mlp).backward()
    assert mlp.router.weight.grad.abs().sum() > 0
