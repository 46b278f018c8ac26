import os
import sys
from pathlib import Path

# Under pytest-xdist (pyproject's addopts: one worker per core) each worker, and each process a
# test starts, takes one thread: two workers at two threads each would contend for the cores.
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests never touch the network: Hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1 if XDIST_WORKER else 2)


import pytest  # noqa: E402
from helpers import write_image_dataset, write_random_teacher  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Six colour classes as train/test parquet, one copy per test module."""
    return write_image_dataset(tmp_path_factory.mktemp("data") / "colors")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """An untrained WRN-16-2 exported as a local-dir: teacher (four classes; its embedding has 128
    dimensions, the students' WRN-16-1 64: tests never see equal sizes that a bug could confuse)."""
    return write_random_teacher(tmp_path_factory.mktemp("t") / "model", name="cifar_wrn_16_2")
