"""Fault injection on W&B start-up (issue 18, hole 13): a bogus ``WANDB_API_KEY`` with no reachable server
used to stall for wandb's 90 s ``init_timeout`` before the run fell back to CSV. Now the start-up waits
at most ``WANDB_START_TIMEOUT`` (5 s), then warns once, in one line, and the run trains with CSV.

The servers here are local only: a closed port (127.0.0.1:9, the discard port, nothing listens) and a socket
that accepts connections and never answers."""

from __future__ import annotations

import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
pytestmark = pytest.mark.timeout(60)  # the old start-up took ~95 s

CONFIG = """
seed_everything: 0
model:
  net: {name: mlp, data_shape: [2], width: 16, depth: 1, emb_dim: 16}
data:
  class_path: flowmap.lightning.datamodules.ToyDataModule
  init_args: {name: checkerboard, n_train: 256, n_val: 16, batch_size: 64}
trainer:
  max_steps: 3
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture
def bogus_wandb(monkeypatch):
    """An online W&B set-up with a made-up key; the caller points WANDB_BASE_URL at a local dead end."""
    import train_teacher  # noqa: F401  (imports Lightning: the timings below measure the start-up, not imports)
    import wandb
    from lightning.pytorch.loggers import WandbLogger  # noqa: F401

    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest makes every other test offline
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    yield monkeypatch
    wandb.teardown()  # stop wandb's service process


def _wandb_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "W&B" in str(w.message)]


def test_hole13_bogus_wandb_key_without_network_falls_back_to_csv_within_seconds(tmp_path, bogus_wandb, capfd):
    import train_teacher

    (tmp_path / "cfg.yaml").write_text(CONFIG)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = train_teacher.main(
            ["--config", str(tmp_path / "cfg.yaml"), "--run_dir", str(tmp_path / "run"), "--logger", "wandb"]
        )
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"start-up plus 3 steps took {elapsed:.1f} s"  # the old code waited ~95 s for W&B alone
    assert cli.trainer.global_step == 3
    metrics = (tmp_path / "run" / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in metrics[0] and len(metrics) == 4  # header + one row per step: CSV took over
    got = _wandb_warnings(caught)
    assert len(got) == 1 and "\n" not in got[0], got
    assert got[0].startswith("W&B logger failed to start within WANDB_INIT_TIMEOUT=5 s") and "CSV" in got[0]
    out, err = capfd.readouterr()
    assert not [line for line in (out + err).splitlines() if "wandb" in line.lower()], err  # nothing else from wandb


def test_hole13_wandb_server_that_never_answers_is_left_after_the_timeout(tmp_path, bogus_wandb):
    from flowmap.lightning.loggers import make_logger

    server = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog) and never replies
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    bogus_wandb.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger = make_logger("wandb", tmp_path / "logs", name="run")
        elapsed = time.perf_counter() - start
        # a user who wants another limit says so through wandb's own variable
        bogus_wandb.setenv("WANDB_INIT_TIMEOUT", "1")
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught_1s:
            warnings.simplefilter("always")
            make_logger("wandb", tmp_path / "logs_1s", name="run")
        elapsed_1s = time.perf_counter() - start
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert type(logger).__name__ == "CSVLogger"
    assert 4.5 < elapsed < 15, elapsed  # the 5 s limit, plus wandb's service start; wandb alone waits 90 s
    got = _wandb_warnings(caught)
    assert len(got) == 1 and "\n" not in got[0] and "logging to CSV instead" in got[0], got
    assert 0.9 < elapsed_1s < 4.5, elapsed_1s
    assert "WANDB_INIT_TIMEOUT=1 s" in _wandb_warnings(caught_1s)[0]
