"""Ctrl-C a real `mistral7b finetune` process once it has written a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def interrupt_after_checkpoint(argv: list[str], out: Path, *,
                               whole_group: bool = False) -> tuple[int, str]:
    """Run `python -m mistral7b.cli.main finetune ARGV`, send SIGINT once OUT holds a
    checkpoint (to the whole process group, as a terminal does, with whole_group), and return
    (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "mistral7b.cli.main", "finetune", *argv],
                            stderr=subprocess.PIPE, text=True, start_new_session=whole_group,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "trainer.json").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        if whole_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            if whole_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
    return proc.returncode, err
