"""Fault injection on shard sets (issue 18, holes 2 and 3).

Hole 2: the corrupt-data limit is judged over a sliding window of the samples each reader tried, with counts
that run on across epochs and DataLoader worker restarts; a run whose epochs are shorter than one pass over
the shards stops with ``CorruptShardError`` (before the fix the counts restarted every epoch and the limit
was judged only after a full pass, so such a run finished with warnings only).
Hole 3: an ``index.json`` missing a required field, holding a bad value, or garbled is one error line naming
the file and the field (before the fix: ``error: 'count'``).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch

from flowmap.data.shards import CorruptShardError, ShardStream, read_index, write_shards
from flowmap.data.slot_stream import StreamOptions
from flowmap.lightning.streaming import ShardDataModule
from flowmap.lightning.teacher_module import TeacherModule

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)
N, PER_SHARD = 512, 64  # 8 shards of 64 samples; sample i is (i, -i)


def _write(root: Path) -> Path:
    write_shards(((torch.tensor([float(i), -float(i)]), -1) for i in range(N)), root, shape=(2,), max_count=PER_SHARD)
    return root


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _garble(path: Path) -> None:
    path.write_bytes(
        torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )


def _drop_members(path: Path, n: int) -> None:
    """Rewrite the tar without its first ``n`` members (n / 2 samples lose both .npy and .cls)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members[n:]:
            tar.addfile(m, io.BytesIO(data))


@pytest.fixture
def damaged(tmp_path) -> Path:
    """The three damages of the issue: shard 0 truncated to 25 %, shard 1 random bytes, shard 2 without 50
    members. 64 + 48 + 25 = 137 of 512 samples are lost (27 %), against a limit of 1 %."""
    root = _write(tmp_path / "s")
    _truncate(root / "shard-000000.tar", 0.25)
    _garble(root / "shard-000001.tar")
    _drop_members(root / "shard-000002.tar", 50)
    return root


def _fit(dm: ShardDataModule, tmp_path: Path, max_steps: int) -> L.Trainer:
    module = TeacherModule(net={"name": "mlp", "data_shape": [2], "width": 8, "depth": 1, "emb_dim": 8})
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def test_hole2_corrupt_limit_trips_within_one_short_epoch(damaged, tmp_path):
    # by_rank reads the shards in order from shard 0 every epoch; an epoch (4 batches of 16 = 64 samples) ends
    # long before one pass (512). The old code judged the share only after a full pass, i.e. never here.
    dm = ShardDataModule(str(damaged), batch_size=16, epoch_length=4, shuffle_buffer=0, split="by_rank")
    with pytest.raises(CorruptShardError, match=r"112 of the last 128 samples .* more than max_corrupt_fraction=0.01"):
        _fit(dm, tmp_path, max_steps=40)  # 10 epochs if nothing stopped it
    trainer = dm.trainer
    # shard 0 gives one batch (16 intact samples), shard 1 none: the window reaches 100 samples inside shard 1
    assert trainer.current_epoch == 0 and trainer.global_step == 1
    assert dm.loader.dataset.counts() == (16, 112)


def test_hole2_counts_run_on_across_epochs_and_worker_restarts(damaged, tmp_path):
    # the default split (each worker draws its own shards with replacement), two workers that restart every
    # epoch, 32 samples per worker per epoch: no single epoch of a worker reaches the 100-sample minimum, so
    # the limit can only trip on counts carried over from earlier epochs
    dm = ShardDataModule(str(damaged), batch_size=16, epoch_length=4, shuffle_buffer=0, num_workers=2, seed=1)
    with pytest.raises(CorruptShardError, match=r"of the last \d+ samples .* \(rank 0, slot [01]\)"):
        _fit(dm, tmp_path, max_steps=200)  # 50 epochs if nothing stopped it
    trainer = dm.trainer
    assert 1 <= trainer.current_epoch < 10, trainer.current_epoch
    good, bad = dm.loader.dataset.counts()  # both workers' rows, kept in shared memory across the restarts
    assert good >= 64 * trainer.current_epoch and bad >= 48


def test_hole2_limit_judges_the_last_window_samples(tmp_path):
    root = _write(tmp_path / "s")
    _garble(root / "shard-000007.tar")  # the last shard of a pass: 64 of 512 samples lost (12.5 %)

    def run(**kw) -> tuple[int, int]:
        stream = ShardStream(
            root,
            StreamOptions(batch_size=64, epoch_length=15, shuffle_buffer=0, max_corrupt_fraction=0.3, **kw),
            split="by_rank",
        )
        list(stream)  # two passes over the shards and the first shard again
        return stream.counts()

    assert run() == (2 * 448 + 64, 2 * 64)  # the default window (100000 samples) sees 12.5 %: trains on
    # a window of 128 samples holds shard 6 (intact) and shard 7 (lost) = 50 % when shard 7 ends
    with pytest.raises(CorruptShardError, match=r"64 of the last 128 samples"):
        run(corrupt_window=128)
    # the minimum count: one damaged sample among the first ones stops a run only when asked to
    path = root / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(b"\x93NUMPY garbage" + data[14:] if m.name == "000000000.npy" else data))
    stream = ShardStream(
        root, StreamOptions(batch_size=64, epoch_length=2, shuffle_buffer=0, max_corrupt_fraction=0.05), split="by_rank"
    )
    assert len(list(stream)) == 2 and stream.counts() == (128, 1)
    strict = ShardStream(
        root,
        StreamOptions(
            batch_size=64, epoch_length=2, shuffle_buffer=0, max_corrupt_fraction=0.05, corrupt_min_samples=1
        ),
        split="by_rank",
    )
    with pytest.raises(CorruptShardError, match=r"1 of the last 1 samples"):
        list(strict)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.pop("count"), "'count'"),
        (lambda m: m.pop("shape"), "'shape'"),
        (lambda m: m.pop("dtype"), "'dtype'"),
        (lambda m: m.pop("num_classes"), "'num_classes'"),
        (lambda m: m["shards"][1].pop("start"), "'shards[1].start'"),
        (lambda m: m.update(count="many"), "'count' has the bad value 'many'"),
        (lambda m: m.update(shape=5), "'shape' has the bad value 5"),
    ],
)
def test_hole3_index_field_missing_or_bad_names_file_and_field(tmp_path, edit, field):
    root = _write(tmp_path / "s")
    meta = json.loads((root / "index.json").read_text())
    edit(meta)
    (root / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as err:
        read_index(root)
    msg = str(err.value)
    assert str(root / "index.json") in msg and field in msg and "\n" not in msg


def test_hole3_index_without_count_is_one_line_from_the_script(tmp_path, capsys):
    from flowmap.lightning.cli import main_guard

    sys.path.insert(0, str(ROOT / "scripts"))
    import train_teacher

    root = _write(tmp_path / "s")
    meta = json.loads((root / "index.json").read_text())
    del meta["count"]
    (root / "index.json").write_text(json.dumps(meta))
    (tmp_path / "cfg.yaml").write_text("model:\n  net: {name: mlp, data_shape: [2], width: 8, depth: 1}\n")
    args = [
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--data",
        "flowmap.lightning.streaming.ShardDataModule",
        "--data.root",
        str(root),
        "--run_dir",
        str(tmp_path / "run"),
        "--logger",
        "none",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: train_teacher.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == f"error: {str(root / 'index.json')!r} lacks the required field 'count'; "
        "rewrite it with scripts/make_shards.py"
    )
    # garbled JSON: the file and the parser's position
    (root / "index.json").write_text('{"format": "flowmap-shards", "count": 5')
    with pytest.raises(ValueError, match=r"index.json' is not readable JSON \(Expecting .* line 1 column"):
        read_index(root)
    (root / "index.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="is not readable JSON"):
        read_index(root)
