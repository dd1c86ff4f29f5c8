"""One set of environment defaults for every launch path: the launcher's ranks (however they were started:
deepspeed, torchrun, a scheduler, plain python), the probe sweeps, the studies and the tests. A value the
caller already set is always kept."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..runtime import bound_cpu_kernel_caches


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) with the defaults filled in:

    * OMP_NUM_THREADS=1: one intra-op thread per rank (ranks share the cores; torchrun sets the same).
    * HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1: nothing is downloaded at run time.
    * TOKENIZERS_PARALLELISM=false: tokenizers' threads do not survive the DataLoader's fork.
    * PYTHONUNBUFFERED=1: a rank's last lines reach the log even when it is killed.
    * TORCH_EXTENSIONS_DIR: a cache of this interpreter's own for DeepSpeed's JIT-built ops, so two
      environments on one machine do not rebuild the op over each other (minutes each on a small CPU).
    * DS_ACCELERATOR=cpu when torch sees no CUDA device (DeepSpeed otherwise probes for accelerators).
    * ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY: the CPU matmul caches bounded
      (:func:`mole_ds.runtime.bound_cpu_kernel_caches`, which says why).
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    bound_cpu_kernel_caches(env)
    prefix = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions_by_prefix" / prefix))
    if "DS_ACCELERATOR" not in env:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:  # pragma: no cover - torch is a dependency
            cuda = False
        if not cuda:
            env["DS_ACCELERATOR"] = "cpu"
    return env


def apply_launch_env() -> None:
    """Fill this process's environment with :func:`launch_env`'s defaults (call before importing DeepSpeed)."""
    threads_unset = "OMP_NUM_THREADS" not in os.environ
    for k, v in launch_env().items():
        os.environ.setdefault(k, v)
    if threads_unset and "torch" in sys.modules:  # torch read the variable at import: apply it directly
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


__all__ = ["apply_launch_env", "launch_env"]
