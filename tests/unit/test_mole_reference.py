"""The MoLE MLP against a per-token computation by hand, for every routing mode; router gradients per mode."""
import pytest
import torch

import mole_ds
from tests.support import reference
from tests.unit.helpers import make_mlp_pair

MODES = ["sparse", "weighted", "st", "dense"]


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("E,top_k", [(1, 1), (4, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("routing", MODES)
def test_every_token_matches_hand_computation(backend, E, top_k, routing):
    (mlp,) = make_mlp_pair(E, top_k, routing, seed=E + top_k, backends=(backend,))
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x).view(-1, 32), reference(mlp, x.view(-1, 32)), rtol=1e-5, atol=1e-5)


def test_oracle_routes_every_token_of_a_sample_to_its_domain_expert():
    (mlp,) = make_mlp_pair(4, 1, "oracle", seed=2, backends=("torch",))
    x = torch.randn(3, 7, 32)
    domains = torch.tensor([2, 0, 5])  # domain 5 -> expert 5 % 4 = 1
    mlp.sample_domains = domains
    with torch.no_grad():
        y = mlp(x)
    counts = mole_ds.routing_counts_by_sample(mlp)[0]  # (B, E)
    assert counts.tolist() == [[0, 0, 7, 0], [7, 0, 0, 0], [0, 7, 0, 0]]
    torch.testing.assert_close(y.view(-1, 32), reference(mlp, x.view(-1, 32), domains.repeat_interleave(7)),
                               rtol=1e-5, atol=1e-5)
    mlp.sample_domains = None
    with pytest.raises(ValueError, match=r"mole.routing \('oracle'\) needs each sample's domain id"):
        mlp(x)


def _task_router_grad(routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    (mlp,) = make_mlp_pair(4, 1, routing, seed=7, backends=("torch",))
    if routing == "oracle":
        mlp.sample_domains = torch.tensor([1, 3])
    x = torch.randn(2, 9, 32)
    y = mlp(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # task loss only, no aux loss
    return mlp.router.weight.grad, y.detach()


def test_router_task_gradient_per_mode():
    grads = {r: _task_router_grad(r) for r in ["sparse", "st", "weighted", "dense", "oracle"]}
    # sparse / oracle: the router gets no gradient from the task (it learns from the aux losses only).
    for r in ("sparse", "oracle"):
        g = grads[r][0]
        assert g is None or g.abs().sum() == 0, r
    for r in ("st", "weighted", "dense"):
        assert grads[r][0].abs().sum() > 0, r
    # st's forward is sparse's, bit for bit.
    assert torch.equal(grads["st"][1], grads["sparse"][1])
