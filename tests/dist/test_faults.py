"""Faults end runs, they never hang them: real ranks of `launchers/train.py` on 2 CPU processes.

* kill -9 of one rank, under the deepspeed launcher and with the ranks started directly (as torchrun or a
  scheduler's srun would): every process is gone, with a nonzero status, within 60 s; no DataLoader worker
  is left behind.
* A data stream that cannot produce a batch (max_length below an image sample; every sample of the shards
  malformed) ends both ranks, nonzero, with the skip counts and the likely fix, within 60 s.
* A damaged newest checkpoint: `resume: auto` falls back to the previous one and says which file is bad; the
  re-run steps appear once in metrics.jsonl and their losses equal the uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from tests.support import ENV, PY, ROOT, free_port, run, train_cmd, train_losses

pytestmark = pytest.mark.dist

DEATH_S = 60  # every rank must be gone this long after a peer's death


def _wait_for_training(out: Path, procs: list[subprocess.Popen], log: Path, timeout: float = 300) -> None:
    """Until metrics.jsonl has a train record (the ranks are past start-up, in the step loop)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and '"train"' in metrics.read_text():
            return
        for p in procs:
            assert p.poll() is None, f"a process exited before training started; see {log}"
        time.sleep(0.5)
    pytest.fail(f"training did not start within {timeout} s; see {log}")


def _rank_process(root_pid: int, local_rank: int) -> psutil.Process:
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if any(a == f"--local_rank={local_rank}" for a in p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank with --local_rank={local_rank} under pid {root_pid}")


def _gone_within(procs: list[psutil.Process], seconds: float) -> tuple[float, dict[int, int | None]]:
    """(seconds until every process in procs has ended, {pid: exit status}); fails (after killing them) past
    ``seconds``. psutil reaps our own children, so their status must be read here, not from Popen."""
    t0 = time.time()
    gone, alive = psutil.wait_procs(procs, timeout=seconds)
    if alive:
        names = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive if p.is_running()]
        for p in alive:
            p.kill()
        pytest.fail(f"{len(alive)} process(es) still alive {seconds} s after a peer's death: {names}")
    return time.time() - t0, {p.pid: p.returncode for p in gone}


def test_kill9_one_rank_under_the_launcher_ends_every_process(demo):
    out = demo["root"] / "kill_launcher"
    log = demo["root"] / "kill_launcher.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(demo["data"], out, "--train.max_steps", "100000", "--checkpoint.every", "0"),
                                env=ENV, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            _wait_for_training(out, [proc], log)
            everything = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            _rank_process(proc.pid, 1).kill()
            took, status = _gone_within(everything, DEATH_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert status[proc.pid] != 0, status
    print(f"launcher: all {len(everything)} processes gone {took:.1f} s after kill -9 of rank 1")


def _start_ranks_directly(demo, name: str, *overrides: str) -> tuple[list[subprocess.Popen], list]:
    """Two ranks of launchers/train.py started as torchrun or srun would (env vars, no launcher watching them),
    each logging to ``<name>_rank<r>.log``; returns (processes, open log files)."""
    port = str(free_port())
    base = [str(PY), str(ROOT / "launchers/train.py")] + train_cmd(
        demo["data"], demo["root"] / name, "--train.max_steps", "100000", "--checkpoint.every", "0", *overrides)[6:]
    procs, logs = [], []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        logs.append(open(demo["root"] / f"{name}_rank{rank}.log", "w"))
        procs.append(subprocess.Popen(base, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, cwd=ROOT,
                                      start_new_session=True))
    return procs, logs


def test_kill9_one_rank_started_directly_ends_the_other(demo):
    """No launcher watches the ranks (torchrun/srun style): the survivor must notice and exit by itself."""
    out = demo["root"] / "kill_direct"
    procs, logs = _start_ranks_directly(demo, "kill_direct")
    try:
        _wait_for_training(out, procs, demo["root"] / "kill_direct_rank0.log")
        survivor = [psutil.Process(procs[0].pid)] + psutil.Process(procs[0].pid).children(recursive=True)
        procs[1].kill()
        took, status = _gone_within(survivor, DEATH_S)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs:
            f.close()
    assert status[procs[0].pid] == 1, status
    text = (demo["root"] / "kill_direct_rank0.log").read_text()
    assert "rank 0 failed" in text and "a peer rank failed, died or hung first" in text, text[-2000:]
    print(f"direct: the survivor and its {len(survivor) - 1} children gone {took:.1f} s after kill -9 of rank 1")


def _expect_data_error(cmd: list[str], log: Path, *needles: str) -> str:
    t0 = time.time()
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=DEATH_S + 120, cwd=ROOT)
    log.write_text(res.stdout + res.stderr)
    text = res.stdout + res.stderr
    assert res.returncode != 0, f"expected a failure; log {log}"
    for n in needles:
        assert n in text, f"{n!r} not in the output; log {log}:\n{text[-3000:]}"
    return f"{time.time() - t0:.0f} s"


def test_max_length_below_an_image_sample_is_refused_before_training(demo):
    took = _expect_data_error(train_cmd(demo["data"], demo["root"] / "short", "--train.max_steps", "5",
                                        "--data.max_length", "16"),
                              demo["root"] / "short.log", "data.max_length (16) cannot hold one image sample",
                              "set data.max_length to at least")
    print(f"max_length 16 refused; both ranks ended in {took}")


def _malformed_copy(src: Path, dst: Path) -> None:
    """A copy of the demo train shards in which every record is malformed (its conversation is not a list)."""
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    for sh in man["shards"]:
        path = dst / sh["url"]
        with tarfile.open(path) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for m, data in members:
                if m.name.endswith(".json"):
                    rec = json.loads(data)
                    rec["conversations"] = "not a list of turns"
                    data = json.dumps(rec).encode()
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime = len(data), m.mtime
                t.addfile(info, io.BytesIO(data))
        path.write_bytes(buf.getvalue())
        sh["bytes"], sh["sha256"] = path.stat().st_size, hashlib.sha256(buf.getvalue()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True))


def test_shards_with_no_usable_sample_end_every_rank(demo):
    bad = demo["root"] / "bad_data"
    _malformed_copy(demo["data"] / "shards/train", bad / "shards/train")
    shutil.copytree(demo["data"] / "shards/eval", bad / "shards/eval")
    took = _expect_data_error(train_cmd(bad, demo["root"] / "bad_run", "--train.max_steps", "5"),
                              demo["root"] / "bad_run.log", "malformed_conversation", "likely fix")
    print(f"all-malformed shards: both ranks ended in {took}")


def test_damaged_newest_checkpoint_falls_back_and_steps_stay_unique(demo):
    """`part` holds checkpoints at steps 3 and 6 (checkpoint.every 3). Truncate step 6's optimizer state: resume
    auto must say so, start from step 3, re-run 4-6 with the uninterrupted run's losses, and metrics.jsonl must
    hold each step once."""
    work = demo["root"] / "damaged"
    shutil.copytree(demo["part"], work)
    tag6 = work / "checkpoints" / "step00000006"
    optim = sorted(tag6.glob("*optim_states.pt"))
    assert optim, sorted(p.name for p in tag6.iterdir())
    optim[0].write_bytes(optim[0].read_bytes()[:1000])
    res = run(train_cmd(demo["data"], work, "--train.max_steps", "6", "--checkpoint.resume", "auto"),
              demo["root"] / "damaged.log")
    text = res.stdout + res.stderr
    assert f"not using checkpoint {tag6}" in text and optim[0].name in text and "truncated" in text
    assert "at step 3" in res.stdout
    recs = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    full, again = train_losses(demo["full"]), train_losses(work)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], abs=1e-5), step


def test_a_refused_config_ends_every_rank_with_status_2_and_no_leftovers(demo):
    """The real launcher with a bad value: each rank refuses it before any process group or model exists."""
    log = demo["root"] / "bad_config.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(demo["data"], demo["root"] / "bad_config", "--train.log_every", "0"),
                                env=ENV, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        everything = [psutil.Process(proc.pid)]
        took, status = _gone_within(everything, 60)
    text = log.read_text()
    assert status[proc.pid] == 2 and "train.log_every (0) must be >= 1" in text, text[-2000:]
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(demo["root"] / "bad_config") in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, [p.pid for p in leftovers]
    print(f"refused config: launcher and ranks gone in {time.time() - t0:.1f} s, status 2")


def test_sigterm_while_blocked_on_a_stuck_peer_exits_after_the_grace_period(demo):
    """Rank 1 is frozen (SIGSTOP: alive, sockets open, so no collective fails); rank 0 blocks in a collective.
    SIGTERM to rank 0 cannot run Python code there; the stop watchdog sees it anyway and ends rank 0 with
    status 1 after train.stop_grace_s, with every thread's stack in its log."""
    out = demo["root"] / "stuck_peer"
    procs, logs = _start_ranks_directly(demo, "stuck_peer", "--train.stop_grace_s", "5")
    try:
        _wait_for_training(out, procs, demo["root"] / "stuck_peer_rank0.log")
        os.kill(procs[1].pid, signal.SIGSTOP)
        time.sleep(3)  # rank 0 is now waiting on rank 1 inside a collective
        os.kill(procs[0].pid, signal.SIGTERM)
        took, status = _gone_within([psutil.Process(procs[0].pid)], 60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs:
            f.close()
    text = (demo["root"] / "stuck_peer_rank0.log").read_text()
    assert status[procs[0].pid] == 1, (status, text[-2000:])
    assert "SIGTERM: stopping at the next step boundary" in text and "Thread" in text, text[-2000:]
    print(f"SIGTERM while blocked: rank 0 gone {took:.1f} s later (grace 5 s)")
