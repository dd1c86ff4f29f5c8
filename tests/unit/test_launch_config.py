"""Launcher config errors are caught before any process group or model exists, naming key and value."""
import json

import pytest

from mole_ds.parallel import check_ep_size
from mole_ds.train.checkpoint import check_topology
from mole_ds.train.config import load_run_config
from mole_ds.train.engine import check_deepspeed_version
from mole_ds.train.launch import prepare

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3}, "mole_ds": {"mole": {"num_experts": 4, "ep_size": 2}}}


def _prep(tmp_path, world, *overrides, ds=None):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds or DS))
    return prepare(["--deepspeed", str(p), *overrides], world)


def test_valid_config_merges_deepspeed_file_then_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("mole:\n  num_experts: 8\ntrain:\n  max_steps: 20\n")
    cfg, ds = _prep(tmp_path, 4, "--config", str(run), "--train.lr", "1e-3")
    assert (cfg.mole.num_experts, cfg.mole.ep_size, cfg.train.max_steps, cfg.train.lr) == (8, 2, 20, 1e-3)
    assert "mole_ds" not in ds  # DeepSpeed never sees our key


@pytest.mark.parametrize("world,overrides,message", [
    (4, ["--mole.ep_size", "3", "--mole.num_experts", "6"], r"world size \(4\) must be divisible by mole.ep_size \(3\)"),
    (2, ["--mole.ep_size", "4"], r"mole.ep_size \(4\) must be <= world size \(2\)"),
    (4, ["--mole.num_experts", "6", "--mole.ep_size", "4"], r"mole.num_experts \(6\) must be divisible by mole.ep_size \(4\)"),
    (2, ["--mole.num_expert", "6"], r"unknown key\(s\) in section 'mole': num_expert"),
    (2, ["--train.max_steps", "ten"], r"train.max_steps \('ten'\) must be an integer"),
    (2, ["--optim.lr", "1"], r"unknown section 'optim'"),
    (2, ["--train.warmup_steps", "50", "--train.max_steps", "10"], r"train.warmup_steps \(50\) must be <= train.max_steps \(10\)"),
    (2, ["--checkpoint.resume", "/nonexistent/ckpt"], r"checkpoint.resume \('/nonexistent/ckpt'\) must be none, auto or"),
])
def test_config_errors(tmp_path, world, overrides, message):
    with pytest.raises(ValueError, match=message):
        _prep(tmp_path, world, *overrides)


def test_deepspeed_config_errors(tmp_path):
    bad = {**DS, "fp16": {"enabled": True}, "train_micro_batch_size_per_gpu": 0, "train_batch_size": 7,
           "zero_optimization": {"stage": 5}}
    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, ds=bad)
    text = str(err.value)
    for msg in ("fp16.enabled (true) is not supported", "train_micro_batch_size_per_gpu (0) must be a positive integer",
                "zero_optimization.stage (5) must be 0, 1, 2 or 3"):
        assert msg in text
    with pytest.raises(ValueError, match=r"--deepspeed \(.*missing.json\) does not exist"):
        prepare(["--deepspeed", str(tmp_path / "missing.json")], 1)


def test_launcher_exits_2_with_message(tmp_path, capsys):
    from mole_ds.train.launch import main

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(DS))
    assert main(["--deepspeed", str(p), "--mole.ep_size", "4"]) == 2
    assert "mole.ep_size (4) must be <= world size (1)" in capsys.readouterr().err


def test_version_range_and_ep_checks():
    with pytest.raises(RuntimeError, match=r"deepspeed 0.18.0 is outside the tested range >=0.19.3,<0.20.0"):
        check_deepspeed_version("0.18.0")
    with pytest.raises(RuntimeError, match="outside the tested range"):
        check_deepspeed_version("0.20.1")
    check_deepspeed_version("0.19.8")
    assert check_ep_size(2, 4, 4) == []
    assert check_ep_size(8, 4) == ["mole.ep_size (8) must be <= world size (4)"]


def test_checkpoint_topology_check(tmp_path):
    meta = {"ep_size": 2, "world_size": 4, "num_experts": 8}
    check_topology(meta, 2, 4, 8, tmp_path)
    with pytest.raises(ValueError, match=r"written with ep_size 2 \(this run: 4\).*tools/export.py"):
        check_topology(meta, 4, 4, 8, tmp_path)


def test_run_config_types_from_yaml(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  domain_weights: {general: 0.5, document: 0.5}\n  train: [a.tar, b.tar]\n")
    cfg = load_run_config(str(run))
    assert cfg.data.domain_weights == {"general": 0.5, "document": 0.5} and cfg.data.train == ["a.tar", "b.tar"]
    run.write_text("mole: [1, 2]\n")
    with pytest.raises(ValueError, match="section 'mole' in .* must be a mapping"):
        load_run_config(str(run))
