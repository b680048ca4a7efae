"""W&B without credentials: a short CLI run with ``--logger wandb`` under WANDB_MODE=offline leaves an offline run
directory whose records hold the losses, the config and the sample images; a logger that fails to start warns
and the run goes on with CSV.

The offline ``.wandb`` file is a LevelDB-style log of wandb's own protobuf ``Record``s (wandb >= 0.19 has no
Python reader any more, so the few lines of framing are read here and every record is parsed with
``wandb.proto.wandb_internal_pb2.Record``)."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

CONFIG = """
seed_everything: 0
model:
  net: {name: mlp, data_shape: [2], width: 16, depth: 2, emb_dim: 16}
  lr: 0.01
  ema_decay: 0.9
data:
  class_path: flowmap.lightning.datamodules.ToyDataModule
  init_args: {name: checkerboard, n_train: 512, n_val: 16, batch_size: 64}
trainer:
  max_steps: 4
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
"""

_BLOCK = 32768
_HEADER = 7  # ":W&B", a 2-byte magic, a version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every ``Record`` of an offline ``run-*.wandb`` file (LevelDB log framing: 32 KiB blocks of chunks, each
    chunk = crc32 (4) + length (2) + type (1) + payload; a record spans FIRST .. MIDDLE .. LAST chunks)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, parts = [], _HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, "corrupt W&B record"
        parts = payload if kind in (_FULL, _FIRST) else parts + payload
        if kind in (_FULL, _LAST):
            rec = Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


def _history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def _run_cli(tmp_path: Path, *extra: str):
    import train_teacher

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    return train_teacher.main(["--config", str(cfg), "--run_dir", str(tmp_path / "run"), *extra])


@pytest.mark.timeout(240)
def test_offline_wandb_run_holds_losses_config_and_sample_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    try:
        _run_cli(tmp_path, "--logger", "wandb", "--sample_every", "2")
    finally:  # finish the run and stop wandb's service so the offline file is complete (a CLI process does so at exit)
        wandb.finish()
        wandb.teardown()
    runs = list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    records = read_wandb_records(next(runs[0].glob("run-*.wandb")))
    rows = _history(records)
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) >= 3 and all(isinstance(v, float) and v == v for v in losses), rows  # one per step, finite
    assert any("train/grad_norm" in row for row in rows) and any("train/lr" in row for row in rows)
    # sample images at steps 2 and 4: history entries naming PNG files under files/media/images
    images = [(row["trainer/global_step"], name) for row in rows for name in row.get("samples/filenames", [])]
    assert [step for step, _ in images] == [2, 4], images
    for _, name in images:
        png = runs[0] / "files" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert all(row["samples/width"] > 100 and row["samples/height"] > 100 for row in rows if "samples/width" in row)
    # the full config (model hyperparameters) went with the run
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") in ("run", "config")
        for u in (r.run.config.update if r.HasField("run") else r.config.update)
    }
    assert config["model"]["net"]["width"] == 16 and config["data"]["init_args"]["batch_size"] == 64
    assert config["trainer"]["max_steps"] == 4 and config["sample_every"] == 2


@pytest.mark.timeout(120)
def test_a_logger_that_fails_to_start_warns_and_training_goes_on(tmp_path, monkeypatch):
    import lightning.pytorch.loggers as loggers

    class BrokenWandb:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("wandb.init timed out (simulated)")

    monkeypatch.setattr(loggers, "WandbLogger", BrokenWandb)
    with pytest.warns(UserWarning, match="W&B logger failed to start .*simulated.*CSV"):
        cli = _run_cli(tmp_path, "--logger", "wandb")
    assert cli.trainer.global_step == 4
    metrics = next((tmp_path / "run" / "logs").rglob("metrics.csv")).read_text().splitlines()
    assert "train/loss" in metrics[0] and len(metrics) >= 5  # header + a row per step
