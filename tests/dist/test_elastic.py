"""Elastic resume on real DeepSpeed CPU ranks: a checkpoint written at one (world size, ep_size) continues at
another, exactly.

tests/dist/worker.py trains the tiny LLaVA-MoLE on fixed global batches (the same whatever the world size; each
rank takes its slice, so the batch of step s is the same samples in every layout) for 4 steps with a checkpoint
at step 2. Each resumed run's steps 3-4 must match the uninterrupted single-process reference (losses and final
trainable weights to 1e-4), which needs the weights and every expert's Adam moments re-sliced to their new
owners and the scheduler and step restored.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.test_expert_parallel import launch

pytestmark = pytest.mark.dist

TAG = "step00000002"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    r = {}

    def go(name, n, *args):
        r[name] = root / name
        launch(n, r[name], *args)

    go("ref", 1, "--stage", "0", "--ep", "1")
    go("w2_ep2", 2, "--stage", "3", "--ep", "2", "--save-at", "2")
    go("w1_ep1", 1, "--stage", "3", "--ep", "1", "--save-at", "2")
    ck_a, ck_b = r["w2_ep2"] / "checkpoints" / TAG, r["w1_ep1"] / "checkpoints" / TAG
    go("w2_ep2_to_w1_ep1", 1, "--stage", "3", "--ep", "1", "--resume", str(ck_a))
    go("w2_ep2_to_w2_ep1", 2, "--stage", "3", "--ep", "1", "--resume", str(ck_a))
    go("w1_ep1_to_w2_ep2", 2, "--stage", "3", "--ep", "2", "--resume", str(ck_b))
    go("w2_ep2_to_w2_z2_ep1", 2, "--stage", "2", "--ep", "1", "--resume", str(ck_a))
    return r


def _losses(d: Path) -> dict:
    return json.loads((d / "losses.json").read_text())


@pytest.mark.parametrize("name", ["w2_ep2_to_w1_ep1", "w2_ep2_to_w2_ep1", "w1_ep1_to_w2_ep2", "w2_ep2_to_w2_z2_ep1"])
def test_resumed_on_another_layout_equals_uninterrupted(runs, name):
    ref, got = _losses(runs["ref"]), _losses(runs[name])
    assert got["start"] == 2 and len(got["losses"]) == 2
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"][2:]), rtol=0, atol=1e-4)
    log = (runs[name].parent / f"{name}.log").read_text()
    assert "re-slicing weights and Adam state" in log
    sa, sb = load_file(str(runs["ref"] / "final.safetensors")), load_file(str(runs[name] / "final.safetensors"))
    assert set(sa) == set(sb) and any(".experts." in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4, msg=k)


def test_writers_match_reference_up_to_the_checkpoint(runs):
    ref = _losses(runs["ref"])["losses"]
    for name in ("w2_ep2", "w1_ep1"):
        torch.testing.assert_close(torch.tensor(_losses(runs[name])["losses"]), torch.tensor(ref), rtol=0, atol=1e-5)


def test_checkpoint_carries_adam_moments(runs):
    # The moments being re-sliced are not zeros (two Adam steps have filled them), so a resume that dropped them
    # would take a different step 3 (Adam's first step from zero moments has magnitude lr per element).
    from mole_ds.consolidate import read_full_state

    st = read_full_state(runs["w2_ep2"] / "checkpoints" / TAG)
    assert st.step == 2
    assert max(float(m["exp_avg"].abs().max()) for m in st.moments.values()) > 1e-4


def _data_loader(tmp_path, rank, world):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "data"))
    from datagen import make_domain

    from mole_ds.data import DataConfig, DomainSource, ShardConfig, build_loader, shard_dataset
    from mole_ds.models import build_tiny_processor

    out = tmp_path / "shards"
    if not out.is_dir():
        domains = [DomainSource(n, make_domain(tmp_path, n, k, image_every=0), str(tmp_path / f"{n}_images"))
                   for n, k in {"general": 16, "medical": 8}.items()]
        shard_dataset(ShardConfig(domains, str(out), max_samples=4, progress=False))
    cfg = DataConfig(urls=str(out), batch_size=2, num_workers=0, max_length=256, shuffle_buffer=0, seed=3)
    return build_loader(cfg, build_tiny_processor(image_size=32, patch_size=8), rank=rank, world_size=world)


def test_data_position_across_a_resize(tmp_path):
    # Mid-epoch: refused, naming the epoch and batch (the position is per rank and per worker).
    two = _data_loader(tmp_path, 0, 2)
    it = iter(two)
    next(it)
    mid = json.loads(json.dumps(two.state_dict()))
    it.close()
    one = _data_loader(tmp_path, 0, 1)
    with pytest.raises(ValueError, match=r"saved at world size 2 \(now 1\) in the middle of epoch 0 \(batch 1 of"):
        one.load_state_dict(mid)
    # At the end of an epoch: the new layout starts the next epoch, and it reads every sample once.
    for _ in two:
        pass
    end = json.loads(json.dumps(two.state_dict()))
    assert end["steps"] == end["epoch_steps"] or end["steps"] == 0
    one = _data_loader(tmp_path, 0, 1)
    one.load_state_dict(end)
    assert one.epoch == end["epoch"] + (1 if end["steps"] else 0) and one.steps == 0
    ids = [i for b in one for i in b["ids"]]
    assert len(ids) == len(set(ids)) == 24
