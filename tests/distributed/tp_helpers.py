"""Starting the ranks of a tensor-parallel run inside a test: one process per rank with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), one torch thread each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CLI = [sys.executable, "-m", "mistral7b.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1", **extra)


def start_ranks(argv_of_rank, world: int = 2, **extra: str) -> list[subprocess.Popen]:
    """argv_of_rank(rank) -> the command of that rank; stdout and stderr captured."""
    port = free_port()
    return [subprocess.Popen(argv_of_rank(r), env=rank_env(r, world, port, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def tp_logits(model: Path, ids: list[int], chunks: list[int], out: Path, quant: str = "none",
              world: int = 2, **extra: str) -> dict:
    """{chunk: rank 0's logits of `ids`} from a `world`-rank run of tp_rank.py."""
    import torch

    torch.save(ids, str(out) + ".ids")
    procs = start_ranks(lambda r: [sys.executable, str(HERE / "tp_rank.py"), "logits", str(model), quant,
                                   str(out), *map(str, chunks)], world, **extra)
    results = finish(procs)
    for rank, (code, _, stderr) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{stderr[-3000:]}"
    return torch.load(out)


def tp_weights(model: Path, quant: str, out: Path, world: int = 2) -> list[dict]:
    """Each rank's quantized layers, dequantized ({module name: weight}), from tp_rank.py."""
    import torch

    procs = start_ranks(lambda r: [sys.executable, str(HERE / "tp_rank.py"), "weights",
                                   str(model), quant, str(out)], world)
    for rank, (code, _, stderr) in enumerate(finish(procs)):
        assert code == 0, f"rank {rank} exited {code}:\n{stderr[-3000:]}"
    return [torch.load(f"{out}.rank{r}") for r in range(world)]
