"""GPU-only: the MegaBlocks backend and the CUDA torch backend against the loop reference."""
import pytest
import torch

from mole_ds.mole.dispatch import LocalDispatcher, get_backend, megablocks_available
from tests.unit.helpers import make_mlp_pair

pytestmark = pytest.mark.gpu


def _fwd_bwd(mlp, x):
    x = x.clone().requires_grad_(True)
    y = mlp(x)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y))
    return y.detach(), {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None} | {"input": x.grad}


@pytest.mark.parametrize("backend", ["torch", "megablocks"])
@pytest.mark.parametrize("E,top_k,routing", [(1, 1, "sparse"), (8, 1, "sparse"), (8, 2, "weighted"), (64, 1, "dense")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_matches_loop(backend, E, top_k, routing, dtype):
    if backend == "megablocks" and not megablocks_available()[0]:
        pytest.fail(f"GPU present but megablocks unusable: {megablocks_available()[1]}")
    fast, ref = make_mlp_pair(E, top_k, routing, hidden=64, inter=128, rank=8, seed=E)
    fast.dispatcher = LocalDispatcher(get_backend(backend, "cuda"))
    fast.cuda().to(dtype)
    ref.cuda().to(dtype)
    x = torch.randn(4, 37, 64, device="cuda", dtype=dtype)
    ya, ga = _fwd_bwd(fast, x)
    yb, gb = _fwd_bwd(ref, x)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ya, yb, **tol)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], **tol, msg=name)
