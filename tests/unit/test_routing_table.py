"""mole_ds.routing_table: the one per-domain routing counter (training, eval plugin, studies) and its heatmap."""
from __future__ import annotations

import json

import pytest
import torch

from mole_ds.eval.routing import DomainRouting
from mole_ds.routing_table import RoutingTable, plot_heatmaps
from mole_ds.train.metrics import RoutingTracker, write_routing_report


def test_batch_counts_go_to_their_domain_rows():
    t = RoutingTable.zeros(2, 3, ["a", "b"])
    c_LBE = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    t.add(c_LBE, torch.tensor([1, 0, 1]))
    assert torch.equal(t.counts[:, 0], c_LBE[:, 1].double())
    assert torch.equal(t.counts[:, 1], (c_LBE[:, 0] + c_LBE[:, 2]).double())
    t.add(c_LBE)  # no domain ids: everything to row 0
    assert torch.equal(t.counts[:, 0], (c_LBE[:, 1] + c_LBE.sum(1)).double())


def test_named_requests_append_domains():
    t = RoutingTable.zeros(0, 2, [])
    t.add_to("z", torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    t.add_to("a", torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
    t.add_to("z", torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert t.domains == ["z", "a"] and t.layers == 2
    assert t.counts[0].tolist() == [[2.0, 4.0], [4.0, 0.0]]
    assert t.shares(0) == [[1 / 3, 2 / 3], [1.0, 0.0]]
    r = DomainRouting(num_experts=2, top_k=2)
    r.add("z", torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert r.to_dict()["domains"]["z"]["tokens"] == 2 and r.to_dict()["layers"] == 2


def test_training_report_uses_the_table(tmp_path):
    tr = RoutingTracker(2, 4, ["x", "y"])
    tr.add(torch.ones(2, 3, 4), torch.tensor([0, 0, 1]))
    assert torch.equal(tr.reduce(), tr.counts)  # one process: nothing to sum
    write_routing_report(tr.reduce(), ["x", "y"], tmp_path, title="t")
    rep = json.loads((tmp_path / "routing.json").read_text())
    assert rep["domains"] == ["x", "y"] and len(rep["layers"]) == 2
    assert rep["layers"][0]["x"] == {"tokens": 8.0, "fraction": [0.25] * 4}
    assert rep["layers"][0]["_all"]["unused_experts"] == 0
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert RoutingTracker(1, 2, []).domains == ["all"]


def test_heatmap_views(tmp_path):
    t = RoutingTable(["a", "b"], [[[3, 1], [0, 2]], [[1, 1], [1, 1]]])
    for panels in ("layer", "domain"):
        path = plot_heatmaps({"arm": t, "other": t}, tmp_path / f"{panels}.png", "title", panels=panels)
        assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"panels \('expert'\) must be one of layer, domain"):
        plot_heatmaps({"arm": t}, tmp_path / "x.png", "title", panels="expert")
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\) must be .* with 3 domains"):
        RoutingTable(["a", "b", "c"], t.counts)
