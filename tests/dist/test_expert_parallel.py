"""Expert parallelism with a ZeRO-3 (or ZeRO-2) base on real DeepSpeed CPU ranks (gloo).

Every run trains the tiny LLaVA-MoLE for a few steps on the same fixed global batches (tests/dist/worker.py);
a single-process ep_size-1 run is the reference the sharded runs must reproduce.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import SAMPLE_ROUTING, WORKER, launch, reference, worker_losses

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def runs(worker_run):
    """All launches of this module, once (tests/dist/conftest.py's worker_run: the session's runs of the same
    configuration are shared with test_elastic and test_consolidate)."""
    r = {}

    def go(name, n, *args):
        r[name] = worker_run(n, *args)

    # Every run takes 4 optimizer steps on the same global batches.
    go("ref", 1, "--stage", "0", "--ep", "1")
    go("z3_w4_ep2", 4, "--stage", "3", "--ep", "2", "--export", "--persist")
    go("z3_w4_ep4", 4, "--stage", "3", "--ep", "4")
    # DeepSpeed's default persistence thresholds, as shipped: every tensor of this model is persistent.
    go("z3_w2_ep2", 2, "--stage", "3", "--ep", "2", "--save-at", "2", "--persist")
    go("z2_w2_ep2", 2, "--stage", "2", "--ep", "2", "--save-at", "2")
    # Its step-2 checkpoint is also one of test_consolidate's layouts (a checkpoint does not change the run).
    go("z3_w2_dp", 2, "--stage", "3", "--ep", "1", "--save-at", "2")
    go("ref_forced", 1, "--stage", "0", "--ep", "1", "--routing", "sparse", "--force-expert", "3")
    go("z3_w2_ep2_forced", 2, "--stage", "3", "--ep", "2", "--routing", "sparse", "--force-expert", "3")
    go("ref_top2", 1, "--stage", "0", "--ep", "1", "--top-k", "2")
    go("z3_w2_ep2_top2", 2, "--stage", "3", "--ep", "2", "--top-k", "2")
    # Restart from step 2 of the two saving runs, in fresh processes.
    for stage, name in (("3", "z3_w2_ep2"), ("2", "z2_w2_ep2")):
        r[f"{name}_ckpt"] = r[name] / "checkpoints" / "step00000002"
        go(f"{name}_resumed", 2, "--stage", stage, "--ep", "2", "--resume", str(r[f"{name}_ckpt"]),
           *(["--persist"] if stage == "3" else []))
    return r


def _assert_same_state(a: Path, b: Path, atol: float) -> None:
    sa, sb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    assert set(sa) == set(sb)
    assert any(".experts." in k for k in sa) and any(".router." in k for k in sa) and any(".lora_A" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=atol, msg=k)


@pytest.mark.parametrize("name,ref", [("z3_w4_ep2", "ref"), ("z3_w4_ep4", "ref"), ("z3_w2_ep2", "ref"),
                                      ("z2_w2_ep2", "ref"), ("z3_w2_dp", "ref"), ("z3_w2_ep2_top2", "ref_top2")])
def test_sharded_run_equals_single_process(runs, name, ref):
    ref_d = runs[ref]
    ref, got = worker_losses(ref_d), worker_losses(runs[name])
    assert len(got["losses"]) == 4
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    # 1e-4 is 1% of one Adam step at lr 1e-2: Adam divides by sqrt(v), so an element whose gradient is near zero
    # turns summation-order noise (ranks add in another order) into a visible update difference (seen: one
    # element of 1024 off by 5e-5); a wrong gradient scale or a lost token moves weights by ~1e-2.
    _assert_same_state(ref_d, runs[name], atol=1e-4)
    # The weights did move (the comparison is not between two untouched initialisations).
    init = load_file(str(ref_d / "final.safetensors"))
    assert max(float(v.abs().max()) for k, v in init.items() if k.endswith("_B")) > 1e-3


# Sample-level routing (mole.routing_level 'sample': one expert per sample and layer, chosen from the pooled
# prompt) with the mutual-information objective and the centered router gradient (tests.support.SAMPLE_ROUTING;
# both are per-rank batch statistics). The MI loss is a statistic of the rank's own batch
# (H(mean_b p_b) over the rank's samples), like every aux loss a per-rank term: its reference is the same
# 2-rank data split with replicated experts (ep 1), not the 1-process run. The ep-2 run also writes the step-2
# checkpoint tests/dist/test_elastic.py resumes on another layout (the same launches, shared).
SAMPLE_TOKENS = 1 + 16 + 12  # every token of a worker sample (BOS, image, text) follows the sample's expert


@pytest.fixture(scope="module")
def sample_runs(worker_run):
    """Two launches of their own (so that selecting these tests does not start every run of the module)."""
    return {"dp": worker_run(2, "--stage", "3", "--ep", "1", *SAMPLE_ROUTING),
            "ep2": worker_run(2, "--stage", "3", "--ep", "2", "--save-at", "2", *SAMPLE_ROUTING)}


def test_sample_routing_under_expert_parallel_equals_replicated_experts(sample_runs):
    ref, got = worker_losses(sample_runs["dp"]), worker_losses(sample_runs["ep2"])
    assert len(got["losses"]) == 4
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    _assert_same_state(sample_runs["dp"], sample_runs["ep2"], atol=1e-4)
    counts = torch.tensor(got["counts"])  # (layers, E) of the last step, over both ranks
    assert counts.tolist() == ref["counts"]
    # One decision per sample and layer: whole samples per expert, every sample of the step counted once.
    assert bool((counts % SAMPLE_TOKENS == 0).all()) and counts.sum(-1).tolist() == [4 * SAMPLE_TOKENS] * 2
    # Samples went to experts of both ep ranks (experts 0-1 on ep rank 0, 2-3 on ep rank 1): rows crossed ranks.
    assert counts[:, :2].sum() > 0 and counts[:, 2:].sum() > 0
    # The weights did move (the comparison is not between two untouched initialisations).
    final = load_file(str(sample_runs["dp"] / "final.safetensors"))
    assert max(float(v.abs().max()) for k, v in final.items() if k.endswith("_B")) > 1e-3


def test_tokens_cross_ranks_in_weighted_run(runs):
    counts = torch.tensor(worker_losses(runs["z3_w4_ep2"])["counts"])  # (layers, E) over all ranks
    # Experts 0-1 live on ep rank 0, 2-3 on ep rank 1: both halves receive tokens from every rank's batch.
    assert counts[:, :2].sum() > 0 and counts[:, 2:].sum() > 0


def test_all_tokens_forced_onto_one_expert(runs):
    ref, got = worker_losses(runs["ref_forced"]), worker_losses(runs["z3_w2_ep2_forced"])
    counts = torch.tensor(got["counts"])
    assert counts[:, 3].sum() == counts.sum() > 0  # every token went to expert 3 (owned by ep rank 1)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    _assert_same_state(runs["ref_forced"], runs["z3_w2_ep2_forced"], atol=1e-4)


@pytest.mark.parametrize("name,ep,world", [("z3_w4_ep2", 2, 4), ("z3_w4_ep4", 4, 4)])
def test_each_rank_holds_its_share(runs, name, ep, world):
    E = 4
    for r in range(world):
        held = json.loads((runs[name] / f"rank{r}.json").read_text())
        assert held["experts"], "no expert tensors found"
        for pname, h in held["experts"].items():
            assert h["experts_held"] == E // ep, pname
            # ZeRO-3 further splits a rank's experts over its expert-data-parallel group (world / ep ranks).
            assert h["local_numel"] == -(-h["full_numel"] // (world // ep)), pname
        big = {k: v for k, v in held["base"].items() if v["full_numel"] >= 256}
        assert big
        for pname, h in big.items():
            assert h["local_numel"] == -(-h["full_numel"] // world), pname  # frozen base: 1/world per rank


def test_persistent_tensors_are_regathered_in_one_collective(runs):
    # ZeRO-3 releases every tensor at each optimizer step and re-gathers the persistent ones; DeepSpeed does it
    # with one all-gather per tensor (one per norm and bias per layer; a quarter of the demo step on gloo).
    # mole_ds coalesces it: one per (partition group, dtype). The threshold-0 run has no persistent tensors and
    # gathers per module instead. The persistent run's results equal the reference
    # (test_sharded_run_equals_single_process) and survive a checkpoint round trip (test_resume_equals_uninterrupted).
    # World 4, ep 2: two partition groups (the 4 data-parallel ranks for the base and routers, the 2-rank
    # expert-data-parallel group for the experts), one gather each; world 2, ep 2: the experts' group has one
    # rank and needs none.
    for name, world, most in (("z3_w2_ep2", 2, 1), ("z3_w4_ep2", 4, 2)):
        for r in range(world):
            comm = json.loads((runs[name] / f"comm_rank{r}.json").read_text())
            gathers = sum(v for k, v in comm["zero_calls_last_step"].items() if "all_gather" in k)
            assert comm["persistent_params"] > 20, comm
            assert 1 <= gathers <= most, (name, r, comm["zero_calls_last_step"])
    for r in range(2):
        dp = json.loads((runs["z3_w2_dp"] / f"comm_rank{r}.json").read_text())
        assert dp["persistent_params"] == 0


@pytest.mark.parametrize("name,world", [("z3_w2_dp", 2), ("z3_w4_ep4", 4)])
def test_link_calibration_is_sane_and_shared(runs, name, world):
    # cost_model.calibrate: every rank gets the same figures (mean over ranks), a positive latency and a finite
    # bandwidth (a large message slower than a small one; a stalled measurement is repeated, not used).
    links = [json.loads((runs[name] / f"link_rank{r}.json").read_text()) for r in range(world)]
    assert all(x == links[0] for x in links), links
    assert 0 < links[0]["alpha_s"] < 0.5 and 1e6 < links[0]["beta_Bps"] < 1e12, links[0]


@pytest.mark.parametrize("name", ["z3_w2_ep2", "z2_w2_ep2"])
def test_resume_equals_uninterrupted(runs, name):
    # ZeRO-2 needs each rank's experts restored from the checkpoint's consolidated file (DeepSpeed writes the
    # module weights from rank 0 only): this test fails without that.
    a, b = worker_losses(runs[name]), worker_losses(runs[f"{name}_resumed"])
    assert b["start"] == 2 and len(b["losses"]) == 2
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"][2:]), rtol=0, atol=1e-6)
    _assert_same_state(runs[name], runs[f"{name}_resumed"], atol=1e-6)


def test_checkpoint_with_other_num_experts_is_refused(runs, tmp_path):
    # Another ep_size or world size is re-sliced (tests/dist/test_elastic.py); another number of experts is a
    # different model and must be refused, naming both values and where the trained weights are.
    res = launch(2, tmp_path / "refused", "--stage", "3", "--ep", "1", "--experts", "2",
                 "--resume", str(runs["z3_w2_ep2_ckpt"]), expect_ok=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "was written with num_experts 4 (this run: 2)" in text and "tools/consolidate.py" in text


def test_exact_match_in_step_when_one_rank_has_no_image(runs):
    # ZeRO-3, 4 ranks: rank 0 decodes a text-only batch while ranks 1-3 encode images; the run would stop on
    # the worker's collective timeout if rank 0's fetches fell out of step (generate() encodes images once,
    # before prefill, so VisionSync's per-forward blank image would add a vision pass at every decoding step).
    em = [json.loads((runs["z3_w4_ep2"] / f"em_rank{r}.json").read_text()) for r in range(4)]
    assert [e["images"] for e in em] == [0, 2, 2, 2]
    assert all(len(e["correct"]) == 2 and all(isinstance(c, bool) for c in e["correct"]) for e in em)


def test_consolidated_export_reproduces_sharded_logits(runs):
    from transformers import LlavaForConditionalGeneration

    import mole_ds

    d = runs["z3_w4_ep2"]
    base = LlavaForConditionalGeneration.from_pretrained(d / "base_model").eval()
    report = mole_ds.load_mole(d / "export.safetensors", base)
    assert report.num_experts == 4 and report.local_experts == 4
    sys.path.insert(0, str(WORKER.parent))
    from worker import make_batch

    probe = make_batch(999, base.config.text_config.vocab_size, base.config.image_token_id, 16)
    probe.pop("labels")
    with torch.no_grad():
        logits = base(**probe).logits
    sharded = torch.cat([torch.load(d / f"logits_rank{r}.pt", weights_only=True) for r in range(4)])
    torch.testing.assert_close(logits, sharded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,world,ep,top_k", [("z3_w4_ep2", 4, 2, 1), ("z3_w2_ep2_top2", 2, 2, 2)])
def test_expert_traffic_is_one_round_trip_of_hidden_rows(runs, name, world, ep, top_k):
    """Per layer and step: one row all-to-all out and one back in forward, the same two in backward, one small
    count exchange; bytes are exactly the remote (token, expert) rows times hidden (+1 column of delta weight
    on the way out in weighted mode), fp32; a rank's rows to itself are not counted."""
    comm = [json.loads((runs[name] / f"comm_rank{r}.json").read_text()) for r in range(world)]
    E, L, D = 4, comm[0]["layers"], comm[0]["hidden"]
    n_local = E // ep
    for r, c in enumerate(comm):
        assert (c["fwd_calls"], c["bwd_calls"], c["meta_calls"]) == (2 * L, 2 * L, L), r
        counts = torch.tensor(c["counts"])  # (layers, E) rows this rank routed in the last step
        mine = (r % ep) * n_local  # first expert owned by this rank's ep rank
        group = [q for q in range(world) if q // ep == r // ep]  # this rank's expert-parallel group
        sent = int(counts.sum() - counts[:, mine:mine + n_local].sum())
        received = sum(int(torch.tensor(comm[q]["counts"])[:, mine:mine + n_local].sum()) for q in group if q != r)
        assert c["fwd_rows"] == sent + received, r
        assert c["fwd_bytes"] == 4 * (sent * (D + 1) + received * D), r
        assert c["bwd_bytes"] == 4 * (sent * D + received * (D + 1)), r
    assert sum(c["fwd_rows"] for c in comm) > 0
    # Per remote row and layer, forward moves ~2 * hidden values (out and back): the minimum for token routing.
    rows = sum(c["fwd_rows"] for c in comm) / 2
    assert sum(c["fwd_bytes"] for c in comm) / rows <= 1.1 * 2 * D * 4


def test_each_token_equals_base_plus_its_own_expert(runs):
    """Under ZeRO-3 + ep 2 on 4 ranks, each token's MoLE output (layer 0) equals the frozen MLP + its expert's
    LoRA computed by hand, one token at a time, from the consolidated weights in one process."""
    from transformers import LlavaForConditionalGeneration

    import mole_ds

    d = runs["z3_w4_ep2"]
    base = LlavaForConditionalGeneration.from_pretrained(d / "base_model").eval()
    mole_ds.load_mole(d / "export.safetensors", base)
    mlp = mole_ds.mole_layers(base)[0]
    assert mlp.config.num_experts == 4 and float(mlp.experts.up_B.detach().abs().max()) > 1e-3
    seen = set()
    for r in range(4):
        io = torch.load(d / f"mlp0_io_rank{r}.pt", weights_only=True)
        x_TD, y_TD = io["x"].reshape(-1, io["x"].shape[-1]), io["y"].reshape(-1, io["y"].shape[-1])
        with torch.no_grad():
            torch.testing.assert_close(y_TD, reference(mlp, x_TD), rtol=1e-5, atol=1e-5)
            seen.update(mlp.router(x_TD).argmax(-1).tolist())
    assert len(seen) > 1  # tokens went to several experts (on both ep ranks)
