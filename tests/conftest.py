import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 (binary layout) named by VITLAB_DATA; tests that need it skip without it."""
    d = os.environ.get("VITLAB_DATA")
    if not d or not (Path(d) / "test_batch.bin").is_file():
        pytest.skip("real CIFAR-10 not available (set VITLAB_DATA)")
    return Path(d)
