"""Shared test settings: deterministic seeds, no W&B network access, repo root importable."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two xdist workers on two cores: one thread each (small ops run far faster without oversubscription)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests launch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets and convolutions run fastest on one thread, and do not stall on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def repo_root() -> Path:
    return ROOT
