"""No hang: stop requests that work while a rank is blocked, and a teardown that always ends the process.

A rank can be blocked where Python never runs its signal handlers (inside a collective waiting for a peer
that is stuck, or a storage read). Three mechanisms make every rank end by itself:

* The collective timeout (``train.collective_timeout_s``, given to ``deepspeed.init_distributed``): a peer
  that died is noticed at once (its sockets close); one that hangs fails the collective after the timeout.
* :class:`StopSignal`: SIGINT/SIGTERM ask for a stop at the next step boundary (final checkpoint, exit 0).
  The C-level signal handler also writes the signal number to a wakeup pipe read by a watchdog thread, so the
  request is seen even while the main thread is blocked; from then on faulthandler's own C thread (which
  needs no interpreter lock) dumps every thread's stack and exits with status 1 unless the boundary is
  reached within the grace period.
* :func:`teardown`: closers (data loaders, metrics) run under a hard deadline, DataLoader workers still
  alive are killed, the process group is destroyed; :func:`exit_now` then ends the process without the
  interpreter's exit handlers, which would wait forever on a child that ignores SIGTERM.

DataLoader workers also die with their parent (PR_SET_PDEATHSIG, set in mole_ds.data.loader's
worker_init_fn), so a rank killed with SIGKILL leaves none behind.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

# Bound on teardown (closing loaders, destroying the process group) after a failure.
TEARDOWN_S = 20.0
# Phrases of torch.distributed / gloo / NCCL errors that mean a peer rank failed, died or hung.
PEER_FAILURE_HINTS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                      "Broken pipe", "NCCL communicator was aborted", "ProcessGroupGloo", "Socket closed")


def _log(msg: str) -> None:
    print(f"[mole_ds] {msg}", file=sys.stderr, flush=True)


class StopSignal:
    """SIGINT/SIGTERM -> stop at the next step boundary on every rank, or exit after a grace period.

    ``requested`` turns true on the signal; :meth:`agreed` (collective) tells every rank whether any rank
    got one, so all stop at the same step; :meth:`reached_boundary` disarms the hard-exit watchdog.
    The grace period is ``max(grace_s, 3 * slowest step so far)`` (see :meth:`note_step`)."""

    def __init__(self, grace_s: float, rank: int = 0) -> None:
        self.grace_s, self.rank = float(grace_s), rank
        self.requested = False
        self.slowest_step_s = 0.0
        self._armed = False
        self._lock = threading.Lock()
        self._previous = {}
        self._wake_r = self._wake_w = None
        self._old_wakeup = -1
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        # The C handler writes each signal's number to this pipe even while the main thread is blocked.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="mole_ds-stop-watch", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        self._arm(signum)

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._wake_r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self._arm(signum)

    def _arm(self, signum: int) -> None:
        with self._lock:
            self.requested = True
            if self._armed:
                return
            self._armed = True
        grace = max(self.grace_s, 3.0 * self.slowest_step_s)
        _log(f"rank {self.rank}: {signal.Signals(signum).name}: stopping at the next step boundary with a final "
             f"checkpoint; exiting with status 1 if it is not reached within {grace:.0f} s")
        faulthandler.dump_traceback_later(grace, exit=True)

    def note_step(self, seconds: float) -> None:
        """Record a step's duration: the grace period is never shorter than 3 steps."""
        self.slowest_step_s = max(self.slowest_step_s, seconds)

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (collective: every rank calls it each step)."""
        t = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def reached_boundary(self) -> None:
        """The loop stopped at a step boundary: the hard exit is no longer needed (the final checkpoint's
        collectives are bounded by the collective timeout)."""
        if self._armed:
            faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Restore the previous handlers (the watchdog thread ends with the pipe)."""
        if self._wake_w is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        os.close(self._wake_w)
        os.close(self._wake_r)
        self._wake_r = self._wake_w = None


def teardown(closers: list[Callable[[], None]], destroy_group: bool = True, deadline_s: float = TEARDOWN_S) -> None:
    """Run ``closers`` (errors are logged, not raised), kill DataLoader workers still alive, destroy the
    process group; a hard exit (status 1) if it all takes longer than ``deadline_s``."""
    faulthandler.dump_traceback_later(deadline_s, exit=True)
    try:
        for close in closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever one closer does
                _log(f"teardown: {type(exc).__name__}: {exc}")
        kill_children()
        if destroy_group and dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001
                _log(f"teardown: destroy_process_group: {type(exc).__name__}: {exc}")
    finally:
        faulthandler.cancel_dump_traceback_later()


def kill_children(wait_s: float = 2.0) -> int:
    """SIGKILL this process's multiprocessing children still alive (DataLoader workers ignore SIGTERM, and
    the interpreter's exit would wait for them forever); returns how many were killed."""
    alive = multiprocessing.active_children()
    for p in alive:
        p.kill()
    end = time.monotonic() + wait_s
    for p in alive:
        try:
            p.join(max(0.0, end - time.monotonic()))
        except RuntimeError as exc:
            # torch's SIGCHLD handler raises in this thread when it sees its DataLoader worker killed.
            _log(f"teardown: {exc}")
    return len(alive)


def describe_failure(exc: BaseException, rank: int) -> str:
    """One line for a failed rank, with a hint when the error says a peer failed first."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    hint = ""
    if any(h in str(exc) for h in PEER_FAILURE_HINTS):
        hint = " (a peer rank failed, died or hung first: look for the first error in the other ranks' output)"
    return f"rank {rank} failed: {text[:2000]}{hint}"


def exit_now(code: int) -> None:
    """Flush and end the process at once, skipping the interpreter's exit handlers (after :func:`teardown`)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


__all__ = ["StopSignal", "describe_failure", "exit_now", "kill_children", "teardown"]
