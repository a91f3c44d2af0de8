import os

# Before anything loads torch (and so libgomp): idle OpenMP threads sleep instead of spinning,
# and each process uses both cores at most. A spinning pool takes its cores for ~ms after
# every parallel region, so two test processes (pytest and a CLI or server it starts) would
# slow each other 10-100x on a 2-core machine. Tests compare numbers, not speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import signal

import pytest
import torch

# A test run started in the background by a non-interactive shell inherits SIGINT ignored,
# and an ignored signal stays ignored across exec: the CLI and fine-tuning processes the
# tests start would never see Ctrl-C, and the Ctrl-C tests would fail for the harness's
# sake. A handler (unlike SIG_IGN) is reset to the default in every child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Keep torch's thread pool small and steady, and the same as the CLI/server subprocesses
    # get through OMP_NUM_THREADS: the int4 kernel's sums are split by thread, so a test that
    # compares a subprocess's greedy ids with this process's needs equal thread counts.
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


@pytest.fixture(scope="session", autouse=True)
def _own_mistral7b_home(tmp_path_factory):
    """A MISTRAL7B_HOME of the test session's own (subprocesses inherit it): `generate` and
    `chat` answer through the servers registered there, so no test may find a server that
    someone else (or another test run) started. Tests of the store set their own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MISTRAL7B_HOME", str(tmp_path_factory.mktemp("mistral7b-home")))
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _kernel_built_once():
    """Our C++ kernel is compiled on first use (about a minute on a fresh machine, cached in
    ~/.cache/mistral7b): do it here, once, so that no test's subprocess (a CLI run, a server,
    a fuzz child under a time limit) pays for it inside its own deadline."""
    from mistral7b.kernels import native

    native.ops()
    yield
