"""Streaming from shards: rank / worker splitting (simulated ranks in one process), a fixed number of batches
per rank, determinism, and the failure cases: fewer shards than ranks x workers, a missing directory or shard
file, a truncated tar and an undecodable member (counted skip, or a clear error past max_corrupt_fraction;
never a hang: every test here has a timeout)."""

from __future__ import annotations

import io
import tarfile
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from flowmap.data.shards import CorruptShardError, ShardStream, read_index, streaming_throughput, write_shards
from flowmap.data.slot_stream import StreamOptions
from flowmap.lightning.streaming import ShardDataModule

pytestmark = pytest.mark.timeout(120)
N, PER_SHARD = 128, 32


@pytest.fixture
def shards(tmp_path):
    """4 shards of 32 samples; sample i is (i, -i), so a value names its key."""
    write_shards(
        ((torch.tensor([float(i), -float(i)]), -1) for i in range(N)), tmp_path / "s", shape=(2,), max_count=PER_SHARD
    )
    return tmp_path / "s"


def _keys(batches) -> list[int]:
    return [int(v) for x, _ in batches for v in x[:, 0]]


def test_by_shard_ranks_read_their_own_shards_with_equal_batch_counts(shards):
    seen = {}
    for rank in range(2):
        stream = ShardStream(
            shards, StreamOptions(batch_size=8, epoch_length=10, shuffle_buffer=16, seed=3, rank=rank, world_size=2)
        )
        batches = list(stream)
        assert len(batches) == len(stream) == 10 and all(x.shape == (8, 2) for x, _ in batches)
        seen[rank] = _keys(batches)
        assert {k // PER_SHARD for k in seen[rank]} <= {rank, rank + 2}  # slot r owns shards r and r + 2
        assert seen[rank] != sorted(seen[rank])  # the shuffle buffer mixed them
    assert not set(seen[0]) & set(seen[1])
    # deterministic given (seed, epoch); another epoch draws another order
    again = ShardStream(
        shards, StreamOptions(batch_size=8, epoch_length=10, shuffle_buffer=16, seed=3, rank=0, world_size=2)
    )
    assert _keys(list(again)) == seen[0]
    again.set_epoch(1)
    assert _keys(list(again)) != seen[0]
    # without resampling, one pass covers each own shard exactly once
    once = ShardStream(
        shards, StreamOptions(batch_size=8, epoch_length=8, shuffle_buffer=0, rank=1, world_size=2, resample=False)
    )
    assert sorted(_keys(list(once))) == list(range(32, 64)) + list(range(96, 128))


def test_by_rank_split_is_disjoint_and_in_key_order(shards):
    for rank in range(3):
        stream = ShardStream(
            shards,
            StreamOptions(batch_size=5, epoch_length=4, shuffle_buffer=0, rank=rank, world_size=3),
            split="by_rank",
        )
        assert _keys(list(stream)) == list(range(rank, N, 3))[:20]


def test_workers_share_the_epoch_length_exactly(shards):
    stream = ShardStream(
        shards, StreamOptions(batch_size=4, epoch_length=5, shuffle_buffer=8, num_workers=2, resample=False)
    )
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(batches) == 5
    keys = _keys(batches)
    # worker w reads shards w and w + 2 (one pass covers 64 samples > 20 drawn): no sample twice
    assert len(set(keys)) == len(keys) == 20
    good, bad = stream.counts()
    assert bad == 0 and good >= 20


def test_loader_state_skips_consumed_batches_on_resume(shards):
    dm = ShardDataModule(str(shards), batch_size=4, epoch_length=5, shuffle_buffer=8, num_workers=2, seed=7)
    loader = dm.train_dataloader()
    epoch0 = [dm.on_before_batch_transfer(b, 0) for b in loader]  # the hook counts what training consumed
    assert dm.state_dict() == {"epoch": 0, "consumed": 5}
    epoch1 = list(loader)
    assert len(epoch0) == len(epoch1) == 5 and not torch.equal(epoch0[0][0], epoch1[0][0])
    assert dm.state_dict() == {"epoch": 1, "consumed": 0}
    resumed = ShardDataModule(str(shards), batch_size=4, epoch_length=5, shuffle_buffer=8, num_workers=2, seed=7)
    resumed.load_state_dict({"epoch": 0, "consumed": 2})
    rest = list(resumed.train_dataloader())
    assert len(rest) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, epoch0[2:]))


def test_fewer_shards_than_ranks_times_workers_fails_before_training(shards):
    with pytest.raises(ValueError, match=r"4 shard\(s\) .* 3 rank\(s\) x 2 worker\(s\) = 6 readers"):
        ShardStream(shards, StreamOptions(batch_size=4, epoch_length=2, world_size=3, num_workers=2))
    dm = ShardDataModule(str(shards), batch_size=4, epoch_length=2, num_workers=2)  # fine on one process
    dm.trainer = SimpleNamespace(global_rank=1, world_size=3, current_epoch=0, training=True)
    with pytest.raises(ValueError, match="6 readers"):
        dm.setup("fit")
    ShardStream(
        shards, StreamOptions(batch_size=4, epoch_length=2, world_size=3, num_workers=2), split="by_rank"
    )  # by_rank is fine


def test_missing_directory_or_shard_file_is_a_clear_error(tmp_path, shards):
    with pytest.raises(ValueError, match="does not exist"):
        ShardDataModule(str(tmp_path / "nowhere"))
    (shards / "shard-000002.tar").unlink()
    dm = ShardDataModule(str(shards), batch_size=4, epoch_length=2)
    with pytest.raises(ValueError, match=r"missing: \['shard-000002.tar'\]"):
        dm.setup("fit")


def _truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) + 100])  # cut inside a member, not on a block boundary


def _intact_samples(path) -> int:
    """Samples (npy + cls) readable from a possibly damaged tar, counted with the standard library."""
    members = set()
    try:
        with tarfile.open(path, "r|") as tar:
            for m in tar:
                tar.extractfile(m).read()
                members.add(m.name)
    except tarfile.TarError:
        pass
    return len({n.split(".")[0] for n in members if n.endswith(".npy") and n.replace(".npy", ".cls") in members})


def test_truncated_tar_is_a_counted_skip_then_a_clear_error(shards):
    _truncate(shards / "shard-000001.tar", keep=0.5)
    lost = PER_SHARD - _intact_samples(shards / "shard-000001.tar")
    assert 10 <= lost <= 22
    # reading every shard twice (resample=False, one slot): the loss is counted exactly, the epoch completes
    stream = ShardStream(
        shards,
        StreamOptions(batch_size=2, epoch_length=N - lost, shuffle_buffer=0, resample=False, max_corrupt_fraction=0.25),
    )
    batches = list(stream)
    assert len(batches) == len(stream) == N - lost
    good, bad = stream.counts()
    assert bad == 2 * lost and good == 2 * N - 2 * lost
    assert all(k // PER_SHARD != 1 or k % PER_SHARD < PER_SHARD - lost for k in _keys(batches))
    stream.set_epoch(1)  # the counters run on across epochs
    assert len(list(stream)) == N - lost and stream.counts() == (4 * N - 4 * lost, 4 * lost)
    # past max_corrupt_fraction: one clear error, also through DataLoader workers (no hang)
    strict = ShardStream(
        shards, StreamOptions(batch_size=4, epoch_length=50, num_workers=1, max_corrupt_fraction=0.05, resample=False)
    )
    with pytest.raises(CorruptShardError, match="damaged or missing, more than max_corrupt_fraction=0.05"):
        list(DataLoader(strict, batch_size=None, num_workers=1, timeout=60))


def test_undecodable_member_is_skipped_and_counted(shards):
    path = shards / "shard-000003.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == "000000100.npy":
                data = b"\x93NUMPY garbage" + data[14:]  # a broken header, same size
            tar.addfile(m, io.BytesIO(data))
    stream = ShardStream(
        shards,
        StreamOptions(batch_size=N - 1, epoch_length=1, shuffle_buffer=0, resample=False, max_corrupt_fraction=0.05),
    )
    keys = _keys(list(stream))
    assert stream.counts() == (N - 1, 1) and 100 not in keys and sorted(keys) == [k for k in range(N) if k != 100]


def test_datamodule_logs_corrupt_samples_and_trains_on(shards, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from flowmap.lightning.teacher_module import TeacherModule

    _truncate(shards / "shard-000000.tar", keep=0.9)
    dm = ShardDataModule(
        str(shards), batch_size=16, epoch_length=6, shuffle_buffer=0, resample=False, max_corrupt_fraction=0.3
    )
    assert dm.data_shape == (2,) and dm.num_classes == 0
    module = TeacherModule(net={"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 16})
    trainer = L.Trainer(
        max_steps=6,
        logger=CSVLogger(str(tmp_path), name="log", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6 and dm.corrupt_samples() > 0
    header, *rows = (tmp_path / "log" / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("data/corrupt_samples")
    logged = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert logged and logged[-1] == dm.corrupt_samples()


def test_streaming_throughput_reports_samples_per_second(shards):
    result = streaming_throughput(shards, batch_size=16, num_batches=4, workers=(1, 2))
    for key in ("memory", "shards_w1", "shards_w2", "ratio_w1", "ratio_w2"):
        assert result[key] > 0, key
    assert result["count"] == N and result["shards"] == len(read_index(shards).shards) == 4
