"""Starting local ranks and joining the process group: the one place that talks to torchrun.

A command given `--tp N` / `--nproc N` on one machine re-runs itself under torchrun
(`launch_local`), so one code path serves `torchrun --nproc-per-node N -m mistral7b.cli ...`
on one or many nodes and the flag on one. Each rank then calls `join()`: gloo on CPU, NCCL on
CUDA, with a timeout on every collective so a rank that dies makes the others fail with an
error instead of hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from mistral7b.errors import InputError

# Seconds a collective may wait for the other ranks before this rank gives up.
DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "MISTRAL7B_COLLECTIVE_TIMEOUT"


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """True inside a process that torchrun (or `launch_local`) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def this_rank() -> Rank:
    """This process's place in the group, from torchrun's environment (rank 0 of 1 outside it)."""
    if not under_torchrun():
        return Rank(0, 1, 0)
    return Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def is_worker_rank() -> bool:
    """True on the ranks other than 0 under torchrun (they do no I/O of their own)."""
    return under_torchrun() and this_rank().rank != 0


def collective_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise InputError(f"{TIMEOUT_ENV} must be positive, got {seconds}")
    return timedelta(seconds=seconds)


def join(device: str = "cpu") -> Rank:
    """Join the default process group (once), gloo for CPU tensors, NCCL for CUDA ones."""
    import torch
    import torch.distributed as dist

    rank = this_rank()
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank.local_rank)
        dist.init_process_group(backend=backend, timeout=collective_timeout())
    return rank


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run `mistral7b ARGV` as `nproc` ranks on this machine under torchrun; its exit code.

    ARGV must no longer ask for a launch (drop `--tp N` / `--nproc N` or the children would
    launch again); the ranks see torchrun's environment and run the distributed path.
    """
    if nproc < 1:
        raise InputError(f"the number of processes must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "--module", "mistral7b.cli.main", *argv]
    env = dict(os.environ)
    # torchrun would set one thread per rank and print a warning; choose it here instead:
    # the machine's cores shared between the ranks.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Ctrl-C in a terminal reaches the whole process group (us, torchrun, the ranks): each
    # rank stops on its own. A SIGTERM sent to this process alone (a service manager, `kill`)
    # is passed on to torchrun, which stops every rank, so no rank outlives us.
    proc = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 + received[0] if received else code
