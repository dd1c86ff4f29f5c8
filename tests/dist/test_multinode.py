"""Two "nodes" on one machine, one rank each, over the loopback interface: torchrun --nnodes 2 --node_rank 0/1,
and the deepspeed runner with a hostfile and --no_ssh --node_rank 0/1 (as docs/multinode.md shows).

* Training (``launchers/train.py``, ZeRO-3, ep_size 2 spanning the two nodes) reproduces the single-node
  2-rank run step by step, and both nodes write into one shared checkpoint directory that the single-node
  layout can resume from.
* Each node's rank reads disjoint samples, and the two together read the whole epoch.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import DEEPSPEED, DEMO_CONFIG, DS_CONFIG, ROOT, TORCHRUN, child_env, free_port, make_demo_data, \
    train_losses

pytestmark = pytest.mark.dist

DATA_WORKER = Path(__file__).with_name("multinode_data_worker.py")
# The "nodes" meet over the loopback interface; torchrun starts the scripts without the repository on sys.path.
ENV = child_env(GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
STEPS = 4


def _fail(what: str, logs: list[Path], rc) -> None:
    text = "\n".join(f"--- {p.name} ---\n" + p.read_text()[-2500:] for p in logs)
    pytest.fail(f"{what} failed ({rc}):\n{text}")


def two_nodes(script: list[str], root: Path, name: str, launcher: str = "torchrun") -> None:
    """Start node 0 and node 1 (one process each) as two launcher invocations that meet at one address:
    ``torchrun``, or ``deepspeed`` with a two-host hostfile and ``--no_ssh --node_rank``."""
    port = free_port()
    hostfile = root / "hostfile"
    if launcher == "deepspeed":
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    procs, logs = [], []
    for node in (0, 1):
        log = root / f"{name}_node{node}.log"
        if launcher == "torchrun":
            cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *script]
        else:
            cmd = [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *script]
        procs.append(subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        logs.append(log)
    rcs = [p.wait(timeout=900) for p in procs]
    if any(rcs):
        _fail(name, logs, rcs)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "launchers/train.py"), "--deepspeed", str(DS_CONFIG), "--config", str(DEMO_CONFIG),
            "--data.train", str(data / "shards/train/manifest.json"), "--data.eval", "[]",
            "--data.num_workers", "0", "--train.output_dir", str(out), "--train.max_steps", str(STEPS),
            "--train.warmup_steps", "1", "--train.log_every", "1", "--train.eval_every", "0",
            "--checkpoint.every", "2", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    data = make_demo_data(root / "data", train_per_domain=8, eval_per_domain=2, max_samples=4)
    single = root / "single"
    log = root / "single.log"
    res = subprocess.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()),
                          *train_args(data, single)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log.write_text(res.stdout + res.stderr)
    if res.returncode:
        _fail("single-node run", [log], res.returncode)
    multi = root / "multi"
    two_nodes(train_args(data, multi), root, "train")
    multi_ds = root / "multi_ds"
    two_nodes(train_args(data, multi_ds), root, "train_ds", launcher="deepspeed")
    ids = root / "ids"
    ids.mkdir()
    two_nodes([str(DATA_WORKER), "--manifest", str(data / "shards/train/manifest.json"), "--out", str(ids)],
              root, "data")
    return {"root": root, "data": data, "single": single, "multi": multi, "multi_ds": multi_ds, "ids": ids}


@pytest.mark.parametrize("name", ["multi", "multi_ds"])  # torchrun; deepspeed --hostfile --no_ssh
def test_two_nodes_match_one_node(runs, name):
    single, multi = train_losses(runs["single"]), train_losses(runs[name])
    assert sorted(single) == sorted(multi) == list(range(1, STEPS + 1))
    for step in single:
        assert multi[step] == pytest.approx(single[step], abs=1e-5), step
    summary = json.loads((runs[name] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["ep_size"] == 2 and summary["zero_stage"] == 3
    assert summary["world_size"] == 2


def test_one_shared_checkpoint_directory(runs):
    ckpts = runs["multi"] / "checkpoints"
    tags = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    assert tags[-1] == f"step{STEPS:08d}"
    tag = ckpts / tags[-1]
    assert (tag / "mole_meta.json").is_file() and (tag / "mole.safetensors").is_file()
    # Both nodes' ZeRO-3 partitions landed in the same tag directory.
    for r in (0, 1):
        assert (tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file(), r
        # DeepSpeed prefixes the optimizer file with "bf16_" when the run trains in bf16 (bf16 "auto" on a CPU
        # with native bf16).
        assert len(list(tag.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))) == 1, r


def test_resume_from_the_shared_checkpoint_on_one_node(runs):
    """The shared directory is one checkpoint: a single-node run resumes from the two-node run's step 2."""
    out = runs["root"] / "resumed"
    import shutil

    shutil.copytree(runs["multi"] / "checkpoints" / "step00000002", out / "checkpoints" / "step00000002")
    res = subprocess.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()),
                          *train_args(runs["data"], out, "--checkpoint.resume", "auto")],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    (runs["root"] / "resumed.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    single, resumed = train_losses(runs["single"]), train_losses(out)
    for step in range(3, STEPS + 1):
        assert resumed[step] == pytest.approx(single[step], abs=1e-5), step


def test_each_node_reads_disjoint_samples(runs):
    from mole_ds.data import DataConfig, build_loader
    from mole_ds.models.processor import build_tiny_processor

    recs = [json.loads((runs["ids"] / f"ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["loader_rank"]) for r in recs] == [(0, 2, 0), (1, 2, 1)]
    assert sorted(r["node_rank"] for r in recs) == [0, 1]
    a, b = set(recs[0]["ids"]), set(recs[1]["ids"])
    assert a and b and not (a & b)
    assert len(a) == len(recs[0]["ids"]) and len(b) == len(recs[1]["ids"])
    whole = build_loader(DataConfig(urls=str(runs["data"] / "shards/train/manifest.json"), batch_size=2,
                                    max_length=128, num_workers=0, shuffle_buffer=1000),
                         build_tiny_processor(image_size=32, patch_size=8), rank=0, world_size=1)
    assert a | b == {i for batch in whole for i in batch["ids"]}
