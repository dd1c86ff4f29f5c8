"""The conflict study: its tasks conflict as documented, its routing statistics are lossless, its paired
statistics are right, and the real CLI (``--quick``) trains arms that learn and route as their definition says."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mole_ds.demo.conflict import make_task
from mole_ds.routing_table import RoutingTable, mutual_information_bits
from mole_ds.studies.conflict import ConflictConfig, _check_resume, arm_names, plan_runs
from mole_ds.studies.conflict_report import aggregate, format_mi_table, format_seed_table
from mole_ds.studies.stats import mean_ci

ROOT = Path(__file__).resolve().parents[2]


# -- the tasks ------------------------------------------------------------------------------------------------
def test_table_task_every_input_conflicts():
    t = make_task("table", num_domains=3, symbols=16, seed=4)
    for d in range(3):
        assert sorted(t.answer_maps_DK[d].tolist()) == list(range(16))  # a permutation
        for e in range(d):
            assert bool((t.answer_maps_DK[d] != t.answer_maps_DK[e]).all())  # same x, another answer
    x_MS, ids_ML, ans_M = t.eval_set(1)
    assert x_MS.squeeze(1).tolist() == list(range(16))  # the whole table, each x once
    assert ids_ML.shape == (16, t.prompt_len) and int(ids_ML.max()) < t.vocab_size
    assert (ids_ML[:, 1] == t.domain_token(torch.tensor(1))).all()
    assert (ans_M == t.answer_token(t.answer_maps_DK[1])).all()
    assert make_task("table", 3, 16, seed=4).answer_maps_DK.equal(t.answer_maps_DK)  # seeded
    assert not make_task("table", 3, 16, seed=5).answer_maps_DK.equal(t.answer_maps_DK)


def test_rule_task_reads_the_domains_slot_and_holds_out_triples():
    t = make_task("rule", num_domains=3, symbols=6, seed=0, train_fraction=0.5)
    train = {tuple(x) for x in t.train_inputs_NS.tolist()}
    held = {tuple(x) for x in t.eval_inputs_MS.tolist()}
    assert not train & held and len(train | held) == 6 ** 3
    x = torch.tensor([[1, 2, 3]])
    for d in range(3):
        a = t.answers(torch.tensor([d]), x)
        assert int(a) == int(t.answer_maps_DK[d, x[0, d]])
        other = x.clone()
        other[0, (d + 1) % 3] = (other[0, (d + 1) % 3] + 1) % 6  # a distractor slot changes: same answer
        assert int(t.answers(torch.tensor([d]), other)) == int(a)
    ids, _ = t.encode(torch.tensor([0, 0]), torch.tensor([[1, 1, 1], [1, 1, 1]]))
    assert len(set(ids[0, 2:5].tolist())) == 3  # each slot has its own alphabet


def test_batches_interleave_domains_per_sample():
    t = make_task("table", 3, 16, seed=0)
    d_B, _ = t.sample(torch.Generator().manual_seed(0), 64, [0, 1, 2])
    assert set(d_B.tolist()) == {0, 1, 2}
    assert (d_B[1:] != d_B[:-1]).sum() > 20  # not blocks


def test_task_errors_name_the_value():
    with pytest.raises(ValueError, match=r"variant \('nope'\)"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"domains \(5\) must be <= symbols \(4\)"):
        make_task("table", num_domains=5, symbols=4)


# -- routing statistics ----------------------------------------------------------------------------------------
def test_routing_table_round_trips_and_measures_mutual_information():
    counts = [[[7, 0, 0], [0, 5, 0], [0, 0, 9]], [[3, 3, 3], [2, 2, 2], [1, 1, 1]]]
    t = RoutingTable(["a", "b", "c"], counts)
    back = RoutingTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and back.to_dict()["counts"] == counts  # raw integer counts: nothing rebuilt
    assert t.mutual_information_bits(1) == pytest.approx(0.0, abs=1e-12)  # routing ignores the domain
    assert t.max_bits() == pytest.approx(math.log2(3))
    # one expert per domain with unequal domain sizes: I = H(domain)
    p = [7 / 21, 5 / 21, 9 / 21]
    assert t.mutual_information_bits(0) == pytest.approx(-sum(q * math.log2(q) for q in p))
    assert mutual_information_bits([[1, 1], [0, 2]]) == pytest.approx(0.3112781, abs=1e-6)
    assert t.shares(0)[1] == [0.0, 1.0, 0.0]


def test_routing_table_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"counts\[0\] has 1 domains, expected 2"):
        RoutingTable(["a", "b"], [[[1, 2]]])
    with pytest.raises(ValueError, match=r"counts\[0\]\[1\] has \[-1\]"):
        RoutingTable(["a", "b"], [[[1, 2], [3, -1]]])
    with pytest.raises(ValueError, match="unknown routing table key"):
        RoutingTable.from_dict({"domains": ["a"], "counts": [[[1]]], "shares": []})


# -- aggregation ---------------------------------------------------------------------------------------------
def _rec(arm: str, seed: int, em: dict, loss: float = 1.0) -> dict:
    return {"variant": "table", "arm": arm, "seed": seed, "em": {str(d): v for d, v in em.items()},
            "loss": {str(d): loss for d in em}, "trainable_params": 10, "steps": 6, "wall_s": 1.0}


def test_paired_deltas_and_per_domain_merge():
    mix = {0: [0.5, 0.6, 0.7], 1: [0.2, 0.4, 0.6], 2: [0.9, 0.9, 0.6]}
    recs = []
    for s in range(3):
        recs.append(_rec("mix", s, {0: mix[s][0], 1: mix[s][1], 2: mix[s][2]}))
        recs.append(_rec("oracle", s, {0: mix[s][0] + 0.1 * (s + 1), 1: mix[s][1], 2: mix[s][2]}))
        for d in range(3):  # the per-domain arm: one record per domain, each scored on its own domain
            recs.append(_rec("per_domain", s, {d: 1.0}, loss=0.5))
    recs.append(_rec("per_domain", 3, {0: 1.0}))  # seed 3: incomplete, so not scored
    agg = aggregate(recs, ["table"], ["per_domain", "mix", "oracle"], [0, 1, 2, 3], 3)
    cells = {(c["arm"], c["domain"]): c for c in agg["cells"]}
    deltas = [0.1 * (s + 1) / 3 for s in range(3)]  # only domain 0 moves; the mean over domains moves by 1/3
    m, h, n = mean_ci(deltas)
    assert cells[("oracle", "mean")]["d_em_mean"] == pytest.approx(m)
    assert cells[("oracle", "mean")]["d_em_ci95"] == pytest.approx(h) and n == 3
    assert cells[("oracle", "d0")]["d_em_mean"] == pytest.approx(0.2)
    assert cells[("oracle", "d1")]["d_em_ci95"] == pytest.approx(0.0)
    assert cells[("per_domain", "mean")]["em_mean"] == 1.0 and cells[("per_domain", "mean")]["em_n"] == 3
    assert cells[("per_domain", "d1")]["d_loss_mean"] == pytest.approx(-0.5)
    assert math.isnan(cells[("mix", "mean")]["d_em_mean"])
    # Per-seed means: the merged per-domain arm is one row per complete seed; the seed table shows them.
    per_seed = {(p["arm"], p["seed"]): p["em_mean"] for p in agg["per_seed"]}
    assert per_seed[("mix", 1)] == pytest.approx(0.4) and ("per_domain", 3) not in per_seed
    seed_md = format_seed_table(agg, ["table"], ["per_domain", "mix", "oracle"], [0, 1, 2, 3])
    assert "| mix | 0.600 | 0.400 | 0.800 |  |" in seed_md


def test_mi_table_reports_each_layer_and_position():
    def rec(seed, sep_layers):
        r = _rec("mole_st", seed, {0: 1.0, 1: 1.0})
        r["routing_sep"] = RoutingTable(["d0", "d1"], sep_layers).to_dict()
        r["routing_all"] = RoutingTable(["d0", "d1"], [[[2, 2], [2, 2]]] * len(sep_layers)).to_dict()
        return r
    recs = [rec(s, [[[4, 0], [0, 4]], [[2, 2], [2, 2]]]) for s in range(2)]
    agg = aggregate(recs, ["table"], ["mole_st"], [0, 1], 2)
    md = format_mi_table(agg, ["table"], ["mole_st"])
    assert "max 1.000" in md
    assert "| mole_st | SEP | 1.000 ± 0.000 | 0.000 ± 0.000 | 2 |" in md  # layer 0 by domain, layer 1 not
    assert "| mole_st | all prompt | 0.000 ± 0.000 | 0.000 ± 0.000 | 2 |" in md


# -- config and plan ---------------------------------------------------------------------------------------------
def test_config_lists_every_problem():
    with pytest.raises(ValueError) as e:
        ConflictConfig(variants=["table", "maze"], experts=1, arms=["nope"], routings=["sparse"], batch=2)
    msg = str(e.value)
    for part in ("variants has 'maze'", "experts (1) must be >= 2", "arms has 'nope'", "batch (2) must be >= domains"):
        assert part in msg


def test_plan_gives_every_arm_the_same_steps_and_samples_per_domain():
    cfg = ConflictConfig(steps_per_domain=10, batch=60)
    runs = plan_runs(cfg, "table", 0)
    assert [r.arm for r in runs] == ["per_domain"] * 3 + arm_names(cfg.routings, cfg.recipes)[1:]
    assert {r.steps for r in runs} == {30}
    per_domain = [r for r in runs if r.arm == "per_domain"]
    assert [r.train_domains for r in per_domain] == [[0], [1], [2]] and {r.batch for r in per_domain} == {20}
    by = {r.arm: r for r in runs}
    assert by["mix_matched"].rank == cfg.experts * cfg.rank and by["mix_matched"].experts == 1
    assert (by["oracle"].routing, by["oracle"].route_by) == ("oracle", "domain")
    assert by["input_hash"].route_by == "input_hash" and by["mole_st"].routing == "st"
    assert [r.arm for r in plan_runs(ConflictConfig(arms=["oracle"]), "rule", 0)] == ["mix", "oracle"]


def test_resume_refuses_a_study_with_other_settings(tmp_path):
    _check_resume(ConflictConfig(out=str(tmp_path)))
    _check_resume(ConflictConfig(out=str(tmp_path), seeds=[7]))  # run lists may change
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.5"):
        _check_resume(ConflictConfig(out=str(tmp_path), lr=0.5))


# -- slow: the real CLI -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_study_learns_and_routes_as_defined(tmp_path):
    out = tmp_path / "cq"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "tools/conflict_study.py"), "--quick", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    arms = arm_names(cfg["routings"], cfg["recipes"])
    doms = [f"d{d}" for d in range(cfg["domains"])]
    cells = {(c["arm"], c["domain"]): c for c in res["cells"]}
    assert set(cells) == {(a, d) for a in arms for d in doms + ["mean"]}
    assert all(c["em_n"] == len(cfg["seeds"]) for c in cells.values())
    # Learning happened: each per-domain LoRA answers its held-out domain far above chance (1/16).
    for d in doms:
        assert cells[("per_domain", d)]["em_mean"] >= 0.9, cells[("per_domain", d)]
    # Routing counts are raw and complete, and the fixed-routing arms route as defined.
    prompt_len = 4  # table variant: BOS, DOM, x, SEP
    for r in res["runs"]:
        if r["experts"] == 1:
            assert "routing_sep" not in r
            continue
        sep, every = RoutingTable.from_dict(r["routing_sep"]), RoutingTable.from_dict(r["routing_all"])
        assert sep.to_dict() == r["routing_sep"]
        for layer in range(sep.layers):
            assert [sum(row) for row in sep.counts[layer]] == [r["eval_size"]] * len(doms)
            assert [sum(row) for row in every.counts[layer]] == [r["eval_size"] * prompt_len] * len(doms)
            if r["arm"] == "oracle":
                assert sep.mutual_information_bits(layer) == pytest.approx(math.log2(3))
                assert every.mutual_information_bits(layer) == pytest.approx(math.log2(3))
            if r["arm"] == "input_hash":  # every domain sees the same inputs: the split ignores the domain
                assert every.mutual_information_bits(layer) == pytest.approx(0.0, abs=1e-12)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(arms) * (len(doms) + 1)
    for png in ("em_bars.png", "routing_table.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert "| oracle |" in first.stdout and "| per_domain |" in first.stdout
    md = (out / "table.md").read_text()
    assert "### routing mutual information, variant `table`" in md and "### EM per seed, variant `table`" in md
    for block in md.split("\n\n"):  # every markdown table: header, separator and rows have equal columns
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in rows}) <= 1, block
    # A rerun resumes: nothing is trained again and the numbers are the same.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and " steps " not in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "results.json").read_text())["cells"] == res["cells"]


def test_salience_measures_what_a_sample_router_sees():
    """mole_ds.studies.salience on known data, then on the toy base: the domain's variance share and a k-means
    split's information about it are measured, not assumed."""
    from mole_ds.studies.conflict_train import TrainSettings, build_base
    from mole_ds.studies.salience import kmeans, salience, variance_share

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(40)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    X = centres[labels] + 0.1 * torch.randn(120, 2, generator=g)
    assert variance_share(X, labels) > 0.99
    assert variance_share(torch.randn(120, 2, generator=g), labels) < 0.1
    ids = kmeans(X + 1000.0, 3)  # a common offset changes nothing for k-means
    assert mutual_information_bits([[float(((labels == d) & (ids == e)).sum()) for e in range(3)]
                                    for d in range(3)]) == pytest.approx(math.log2(3))
    task = make_task("rule", 3, 8, seed=0)
    rows = salience(build_base(task, TrainSettings(), 0).eval(), task, samples=96)
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 < r["domain_r2"] < 1.0 and len(r["slot_r2"]) == 3 and r["mean_to_spread"] > 0
        assert 0.0 <= r["kmeans_mi_bits"] <= r["max_bits"] + 1e-9
