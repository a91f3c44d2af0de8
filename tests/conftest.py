import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare numbers, not speed: keep torch's thread pool small and steady.
    torch.set_num_threads(2)
    yield
