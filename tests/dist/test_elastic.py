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

from tests.support import (PY, ROOT, SAMPLE_ROUTING, free_port, log_of, make_demo_data, records, run,
                           worker_losses)

pytestmark = pytest.mark.dist

TAG = "step00000002"


@pytest.fixture(scope="module")
def runs(worker_run):
    """The launches of this module, once (tests/dist/conftest.py's worker_run: "ref" is test_expert_parallel's
    reference, and "w2_ep2"'s checkpoint is also one of test_consolidate's layouts)."""
    r = {}

    def go(name, n, *args):
        r[name] = worker_run(n, *args)

    go("ref", 1, "--stage", "0", "--ep", "1")
    go("w2_ep2", 2, "--stage", "3", "--ep", "2", "--save-at", "2")
    go("w1_ep1", 1, "--stage", "3", "--ep", "1", "--save-at", "2")
    ck_a, ck_b = r["w2_ep2"] / "checkpoints" / TAG, r["w1_ep1"] / "checkpoints" / TAG
    go("w2_ep2_to_w1_ep1", 1, "--stage", "3", "--ep", "1", "--resume", str(ck_a))
    go("w2_ep2_to_w2_ep1", 2, "--stage", "3", "--ep", "1", "--resume", str(ck_a))
    go("w1_ep1_to_w2_ep2", 2, "--stage", "3", "--ep", "2", "--resume", str(ck_b))
    go("w2_ep2_to_w2_z2_ep1", 2, "--stage", "2", "--ep", "1", "--resume", str(ck_a))
    return r


@pytest.mark.parametrize("name", ["w2_ep2_to_w1_ep1", "w2_ep2_to_w2_ep1", "w1_ep1_to_w2_ep2", "w2_ep2_to_w2_z2_ep1"])
def test_resumed_on_another_layout_equals_uninterrupted(runs, name):
    ref, got = worker_losses(runs["ref"]), worker_losses(runs[name])
    assert got["start"] == 2 and len(got["losses"]) == 2
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"][2:]), rtol=0, atol=1e-4)
    log = log_of(runs[name]).read_text()
    assert "re-slicing weights and Adam state" in log
    sa, sb = load_file(str(runs["ref"] / "final.safetensors")), load_file(str(runs[name] / "final.safetensors"))
    assert set(sa) == set(sb) and any(".experts." in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4, msg=k)


# Sample-level routing with the MI objective, as in test_expert_parallel's sample-routing runs (the same
# arguments, so the same launches: the ep-2 writer and the ep-1 reference are shared). The MI loss is a statistic
# of each rank's own batch, so a resume continues the same training only on the same data split: 2 ranks, here
# with the experts replicated (ep 1) instead of split (ep 2).


@pytest.fixture(scope="module")
def sample_runs(worker_run):
    """The three launches of the sample-routing resume (their own fixture: selecting this test does not start
    every run of the module)."""
    r = {"w2_ep2": worker_run(2, "--stage", "3", "--ep", "2", "--save-at", "2", *SAMPLE_ROUTING),
         "w2_ep1": worker_run(2, "--stage", "3", "--ep", "1", *SAMPLE_ROUTING)}
    ck = r["w2_ep2"] / "checkpoints" / TAG
    r["w2_ep2_to_w2_ep1"] = worker_run(2, "--stage", "3", "--ep", "1", "--resume", str(ck), *SAMPLE_ROUTING)
    return r


def test_sample_routing_resumed_on_another_layout_equals_uninterrupted(sample_runs):
    got = worker_losses(sample_runs["w2_ep2_to_w2_ep1"])
    assert got["start"] == 2 and len(got["losses"]) == 2
    assert "re-slicing weights and Adam state" in log_of(sample_runs["w2_ep2_to_w2_ep1"]).read_text()
    # Against the run that wrote the checkpoint (ep 2) and the uninterrupted run of the new layout (ep 1).
    for name in ("w2_ep2", "w2_ep1"):
        ref = worker_losses(sample_runs[name])
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"][2:]), rtol=0, atol=1e-4)
        assert got["counts"] == ref["counts"], name  # the same experts for every sample at the last step
        sa = load_file(str(sample_runs[name] / "final.safetensors"))
        sb = load_file(str(sample_runs["w2_ep2_to_w2_ep1"] / "final.safetensors"))
        assert set(sa) == set(sb) and any(".router." in k for k in sa)
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")


def test_writers_match_reference_up_to_the_checkpoint(runs):
    ref = worker_losses(runs["ref"])["losses"]
    for name in ("w2_ep2", "w1_ep1"):
        torch.testing.assert_close(torch.tensor(worker_losses(runs[name])["losses"]), torch.tensor(ref), rtol=0, atol=1e-5)


def test_checkpoint_carries_adam_moments(runs):
    # The moments being re-sliced are not zeros (two Adam steps have filled them), so a resume that dropped them
    # would take a different step 3 (Adam's first step from zero moments has magnitude lr per element).
    from mole_ds.checkpoint import read_full_state

    st = read_full_state(runs["w2_ep2"] / "checkpoints" / TAG)
    assert st.step == 2
    assert max(float(m["exp_avg"].abs().max()) for m in st.moments.values()) > 1e-4


def _data_loaders(tmp_path, world, batch_size, num_workers=0, streams=4, **kw):
    """One loader per rank of a `world`-rank run (the ranks' loaders run in this process)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "data"))
    from datagen import make_domain

    from mole_ds.data import DataConfig, DomainSource, ShardConfig, build_loader, shard_dataset
    from mole_ds.models import build_tiny_processor

    out = tmp_path / "shards"
    if not out.is_dir():  # 8 shards of 3 samples: 2 shards per stream, so an epoch is 24 samples, no padding
        domains = [DomainSource(n, make_domain(tmp_path, n, k, image_every=3), str(tmp_path / f"{n}_images"))
                   for n, k in {"general": 15, "medical": 9}.items()]
        shard_dataset(ShardConfig(domains, str(out), max_samples=3, progress=False))
    cfg = DataConfig(urls=str(out), batch_size=batch_size, num_workers=num_workers, max_length=256,
                     shuffle_buffer=2, seed=3, streams=streams, **kw)
    proc = build_tiny_processor(image_size=32, patch_size=8)
    return [build_loader(cfg, proc, rank=r, world_size=world) for r in range(world)]


def _global_batches(loaders, steps=None, state=None, accum=1):
    """Run the ranks' loaders side by side: the ids of each global batch (rank order within a step, `accum`
    steps per global batch), and the merged state after `steps` steps (None: the whole epoch)."""
    from mole_ds.data import merge_states

    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    per_rank = []
    for ld in loaders:  # the ranks are independent: run them one after the other
        it = iter(ld)
        per_rank.append([b["ids"] for b in (it if steps is None else (next(it) for _ in range(steps)))])
        it.close()
    micro = [[i for ids in step for i in ids] for step in zip(*per_rank, strict=True)]
    out = [[i for m in micro[s:s + accum] for i in m] for s in range(0, len(micro), accum)]
    merged = json.loads(json.dumps(merge_states([ld.state_dict() for ld in loaders])))  # as in a checkpoint
    return out, merged


# (world size, per-rank batch, DataLoader workers, steps per global batch of 4 samples from 4 streams).
# w1_mb2 and w2_mb1 take 2 samples per step: each step reads one of two groups of 2 streams (a round is 2 steps),
# as a run with gradient accumulation 2 would.
LAYOUTS = {"w2": (2, 2, 1, 1), "w1": (1, 4, 2, 1), "w4": (4, 1, 0, 1), "w1_mb2": (1, 2, 1, 2), "w2_mb1": (2, 1, 0, 2)}


def _run(tmp_path, name, steps=None, state=None, **kw):
    world, batch, workers, accum = LAYOUTS[name]
    return _global_batches(_data_loaders(tmp_path, world, batch, workers, **kw), steps, state, accum)


def test_global_batches_do_not_depend_on_the_world_size(tmp_path):
    ref, _ = _run(tmp_path, "w2")
    ids = [i for b in ref for i in b]
    assert len(ref) == 6 and len(ids) == len(set(ids)) == 24  # one epoch, each sample once
    for name in ("w1", "w4", "w1_mb2", "w2_mb1"):
        got, _ = _run(tmp_path, name)
        assert got == ref, name


@pytest.mark.parametrize("src,dst", [("w2", "w1"), ("w1", "w2"), ("w2", "w4"), ("w4", "w1"), ("w2", "w1_mb2"),
                                     ("w1_mb2", "w2"), ("w2_mb1", "w1_mb2")])
def test_mid_epoch_resize_continues_the_same_global_batches(tmp_path, src, dst):
    ref, _ = _run(tmp_path, src)
    head, state = _run(tmp_path, src, steps=2 * LAYOUTS[src][3])  # two global batches
    assert len(head) == 2 and len(state["positions"]) == 4
    tail, end = _run(tmp_path, dst, state=state)
    assert head + tail == ref  # nothing repeated, nothing skipped, and the same samples in every global batch
    assert end["epoch"] == 1 and end["steps"] == 0


def test_inside_a_round_only_the_same_layout_continues(tmp_path):
    ref, _ = _run(tmp_path, "w1_mb2")
    _, state = _run(tmp_path, "w1_mb2", steps=3)  # 1.5 global batches: inside the second round
    with pytest.raises(ValueError, match=r"inside a round of 2 steps .*only the same world size and batch size"):
        _data_loaders(tmp_path, 2, 2, 1)[0].load_state_dict(state)
    loader = _data_loaders(tmp_path, 1, 2, 1)[0]
    loader.load_state_dict(state)
    rest = [b["ids"] for b in loader]
    flat = [i for b in ref for i in b]
    assert [i for b in rest for i in b] == flat[6:]  # steps 4-12 of 2 samples each


def test_mid_epoch_resize_that_cannot_be_exact_is_refused(tmp_path):
    _, state = _run(tmp_path, "w2", steps=3)
    with pytest.raises(ValueError, match=r"middle of epoch 0 \(step 3 of 6\) with data.streams 4.*multiple of "
                                         r"the world size \(3\)"):
        _data_loaders(tmp_path, 3, 2, streams=0)[0].load_state_dict(state)  # 4 streams cannot split over 3 ranks
    with pytest.raises(ValueError, match=r"after 3 samples per stream; this layout takes 2 per stream"):
        _data_loaders(tmp_path, 2, 4)[0].load_state_dict(state)  # a global batch of 8 does not divide 3
    one_rank = _data_loaders(tmp_path, 2, 2)[0]
    it = iter(one_rank)
    next(it)
    unmerged = one_rank.state_dict()  # rank 0's streams only
    it.close()
    with pytest.raises(ValueError, match=r"no position for stream\(s\) \[2, 3\].*merged over all ranks"):
        _data_loaders(tmp_path, 1, 4, 2)[0].load_state_dict(unmerged)


def test_mixing_mode_resize_continues_the_same_global_batches(tmp_path):
    kw = dict(domain_weights={"general": 0.5, "medical": 0.5}, samples_per_epoch=32)
    ref, _ = _run(tmp_path, "w2", **kw)
    assert len(ref) == 8
    head, state = _run(tmp_path, "w2", steps=3, **kw)
    tail, _ = _run(tmp_path, "w1_mb2", state=state, **kw)
    assert head + tail == ref


# --- the whole product: a run checkpointed mid-epoch continues on another world size ---------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`deepspeed launchers/train.py` over the demo data (24 samples: one epoch is 6 steps of a global batch of
    4 from data.streams 4), fp32, sample ids logged:
      w2:      2 ranks, ZeRO-3 ep 2, 6 steps uninterrupted (with a checkpoint at step 3, mid-epoch);
      w2_w1:   that checkpoint resumed on 1 rank (ep 1, micro-batch 4) to step 6;
      w1:      1 rank for 3 steps (checkpoint at step 3);
      w1_w2:   that checkpoint resumed on 2 ranks (ZeRO-3 ep 2) to step 6;
      w2_ep1:  w2's checkpoint resumed on 2 ranks with ep 1 (replicated experts) to step 6;
      w1_ga2:  w2's checkpoint resumed on 1 rank keeping the micro-batch of 2, with gradient accumulation 2.
    mole.dropout is 0: dropout masks belong to each rank's RNG stream, which another layout cannot continue."""
    root = tmp_path_factory.mktemp("elastic_launch")
    data = make_demo_data(root / "data", train_per_domain=8, eval_per_domain=2, max_samples=8)
    base = json.loads((ROOT / "ds_configs/zero3_ep_fp32.json").read_text())

    def go(name: str, ranks: int, *extra: str, ep: int | None = None, accum: int = 1) -> Path:
        ds = {**base, "train_micro_batch_size_per_gpu": 4 // ranks // accum, "gradient_accumulation_steps": accum,
              "mole_ds": {"mole": {**base["mole_ds"]["mole"], "ep_size": ep or ranks}}}
        (root / f"{name}.json").write_text(json.dumps(ds))
        out = root / name
        run([str(PY.with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port", str(free_port()),
             str(ROOT / "launchers/train.py"), "--deepspeed", str(root / f"{name}.json"),
             "--config", str(ROOT / "launchers/configs/demo.yaml"),
             "--data.train", str(data / "shards/train/manifest.json"), "--data.eval", "[]", "--data.streams", "4",
             "--data.num_workers", "1", "--train.output_dir", str(out), "--train.max_steps", "6",
             "--train.warmup_steps", "2", "--train.log_every", "1", "--train.log_sample_ids", "true",
             "--checkpoint.every", "3", "--mole.dropout", "0", *extra], root / f"{name}.log")
        return out

    r = {"root": root}
    r["w2"] = go("w2", 2)
    r["w1"] = go("w1", 1, "--train.run_steps", "3")
    ck = "checkpoints/step00000003"
    r["w2_w1"] = go("w2_w1", 1, "--checkpoint.resume", str(r["w2"] / ck))
    r["w1_w2"] = go("w1_w2", 2, "--checkpoint.resume", str(r["w1"] / ck))
    r["w2_ep1"] = go("w2_ep1", 2, "--checkpoint.resume", str(r["w2"] / ck), ep=1)
    r["w1_ga2"] = go("w1_ga2", 1, "--checkpoint.resume", str(r["w2"] / ck), accum=2)
    return r


def test_launched_run_sees_one_epoch_whatever_the_world_size(launched):
    ref = {s: r["ids"] for s, r in records(launched["w2"], "samples").items()}
    ids = [i for s in sorted(ref) for i in ref[s]]
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and len(ids) == len(set(ids)) == 24  # one epoch, each sample once
    for name, steps in (("w1", [1, 2, 3]), ("w2_w1", [4, 5, 6]), ("w1_w2", [4, 5, 6]), ("w2_ep1", [4, 5, 6]),
                        ("w1_ga2", [4, 5, 6])):
        got = {s: r["ids"] for s, r in records(launched[name], "samples").items()}
        assert sorted(got) == steps, name  # a resumed run writes to its own output_dir: steps 4-6
        assert all(got[s] == ref[s] for s in steps), name  # the same samples in every global step


@pytest.mark.parametrize("name", ["w1", "w2_w1", "w1_w2", "w2_ep1", "w1_ga2"])
def test_launched_resize_continues_the_same_training(launched, name):
    # The task loss is a mean over all supervised tokens of the step (not of per-rank means), so a step on
    # 1 rank and the same step on 2 ranks are the same step.
    ref = {s: r["loss"] for s, r in records(launched["w2"], "train").items()}
    got = {s: r["loss"] for s, r in records(launched[name], "train").items()}
    assert got, name
    for s in got:
        assert got[s] == pytest.approx(ref[s], abs=1e-4), (name, s, got[s], ref[s])
    if name != "w1":
        assert "re-slicing weights and Adam state" in (launched["root"] / f"{name}.log").read_text()
        a = load_file(str(launched["w2"] / "checkpoints/step00000006/mole.safetensors"))
        b = load_file(str(launched[name] / "checkpoints/step00000006/mole.safetensors"))
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
