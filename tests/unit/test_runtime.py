"""mole_ds.runtime: the CPU matmul caches are bounded, and the bound is what keeps a MoLE run's memory flat."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mole_ds.runtime import CPU_KERNEL_CACHE_VARS, bound_cpu_kernel_caches
from mole_ds.train.env import launch_env
from tests.support import child_env

# A MoLE layer's expert products: one new row count per step. 240 distinct shapes, forward and backward, bf16.
CHURN = """
import json, os, sys
if sys.argv[1] != "default":
    from mole_ds.runtime import bound_cpu_kernel_caches
    bound_cpu_kernel_caches(capacity=int(sys.argv[1]))
import torch
torch.set_num_threads(1)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
w = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
(torch.randn(1, 64, dtype=torch.bfloat16) @ w).sum().backward()
start = rss()
for rows in range(2, 242):
    (torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True) @ w).sum().backward()
print(json.dumps({"growth": rss() - start}))
"""


def test_bound_sets_defaults_and_keeps_what_the_user_set(monkeypatch):
    for var in CPU_KERNEL_CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    got = bound_cpu_kernel_caches(capacity=32)
    assert got == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "7"}
    env = launch_env({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})  # a launch's environment: the same rule
    assert env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024" and env["LRU_CACHE_CAPACITY"] == "128"


def _growth(capacity: str) -> int:
    env = child_env()
    for var in CPU_KERNEL_CACHE_VARS:
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-c", CHURN, capacity], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bound_keeps_memory_flat_under_changing_matmul_shapes():
    """Unbounded (PyTorch's default 1,024 entries per cache) the 240 shapes keep ~0.6 MiB of kernels each; with
    a bound of 8, set in-process before the first matmul as setup_training does, almost nothing is kept."""
    unbounded, bounded = _growth("default"), _growth("8")
    assert unbounded > 64 * 2 ** 20, unbounded  # the effect is real on this build, else the test shows nothing
    assert bounded < 0.25 * unbounded, (bounded, unbounded)
