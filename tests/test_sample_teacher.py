"""scripts/sample.py on teachers (issue 20): any teacher kind, sampled in chunks of --batch_size into a streamed
.npz or shards; the same samples as the solver on the same noise; students still sample; one-line refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmap.data.npz_stream import write_npz_chunks
from flowmap.data.shards import read_all
from flowmap.models import save_student, save_teacher
from flowmap.nets import build_net
from flowmap.solvers import solve
from flowmap.student import FlowMap
from flowmap.time_grids import make_grid
from flowmap.velocity import NetVelocity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sample as sample_script

MLP = {"name": "mlp", "data_shape": [2], "width": 16, "depth": 2, "emb_dim": 16}


def chunk_noise(n: int, batch: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((min(batch, n - s), *shape), generator=g) for s in range(0, n, batch)]


class MaxBatch:
    """Records the largest batch any module forward sees (a global forward pre-hook; observation only)."""

    def __enter__(self):
        self.largest = 0

        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
                self.largest = max(self.largest, args[0].shape[0])

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_flowmap_teacher_file_in_chunks_gives_the_solver_samples(tmp_path):
    torch.manual_seed(0)
    teacher = NetVelocity(build_net(dict(MLP)), "linear", "velocity").eval()
    path = save_teacher(tmp_path / "t.safetensors", teacher)
    with MaxBatch() as seen:
        sample_script.main(
            [
                str(path),
                "--n",
                "10",
                "--batch_size",
                "4",
                "--steps",
                "6",
                "--solver",
                "edm_heun",
                "--grid",
                "edm",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert seen.largest == 4  # memory holds one chunk
    with np.load(tmp_path / "o" / "samples.npz", allow_pickle=False) as f:
        x = torch.from_numpy(f["x"])
        assert f.files == ["x"] and x.shape == (10, 2) and x.dtype == torch.float32
    with torch.no_grad():
        want = torch.cat([solve(teacher, z, make_grid("edm", 6), "edm_heun") for z in chunk_noise(10, 4, (2,))])
    assert torch.allclose(x, want, atol=1e-6, rtol=0)
    assert (tmp_path / "o" / "samples.png").is_file()
    # the same run as shards holds the same samples
    sample_script.main(
        [
            str(path),
            "--n",
            "10",
            "--batch_size",
            "4",
            "--steps",
            "6",
            "--solver",
            "edm_heun",
            "--grid",
            "edm",
            "--shards",
            "--shard_size",
            "3",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    xs, ys = read_all(tmp_path / "o" / "shards")
    assert torch.equal(xs, x) and torch.equal(ys, torch.full((10,), -1))


def test_a_student_file_still_samples(tmp_path):
    torch.manual_seed(0)
    student = FlowMap(build_net(dict(MLP)))
    path = save_student(tmp_path / "s.safetensors", student, method="cd", objective={"name": "cd"})
    sample_script.main([str(path), "--n", "8", "--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s" / "samples.npz", allow_pickle=False) as f:
        assert f["x"].shape == (8, 2) and np.isfinite(f["x"]).all()


def test_npz_stream_round_trip_and_bad_chunks(tmp_path):
    parts = [np.random.default_rng(i).normal(size=(k, 3, 2)).astype(np.float32) for i, k in enumerate((5, 5, 2))]
    path = write_npz_chunks(tmp_path / "a.npz", iter(parts), 12, (3, 2), extra={"y": np.arange(12)})
    with np.load(path, allow_pickle=False) as f:
        assert np.array_equal(f["x"], np.concatenate(parts)) and np.array_equal(f["y"], np.arange(12))
    with pytest.raises(ValueError, match="the chunks held 10 rows, x has 12"):
        write_npz_chunks(tmp_path / "b.npz", iter(parts[:2]), 12, (3, 2))
    assert not (tmp_path / "b.npz").exists()  # atomic: nothing half-written


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    folder = tmp_path_factory.mktemp("diffusers") / "ddpm"
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=50, beta_end=0.2).save_pretrained(folder)  # clip_sample=True
    return folder


def test_diffusers_folder_with_clipping_is_sampled_like_diffusers(tmp_path, clip_folder):
    from teachers import load_teacher
    from teachers.diffusers_sampler import ddim_sample

    folder = clip_folder
    sample_script.main(
        [
            str(folder),
            "--n",
            "6",
            "--batch_size",
            "4",
            "--steps",
            "5",
            "--teacher_sampler",
            "diffusers",
            "--out",
            str(tmp_path / "d"),
        ]
    )
    teacher, _ = load_teacher(folder, allow_clip_mismatch=True)
    want = torch.cat([ddim_sample(teacher, z, 5) for z in chunk_noise(6, 4, (1, 8, 8))])
    with np.load(tmp_path / "d" / "samples.npz", allow_pickle=False) as f:
        assert np.allclose(f["x"], want.numpy(), atol=1e-5, rtol=0)


def test_ode_sampling_of_a_clipping_folder_is_one_line(tmp_path, clip_folder, monkeypatch, capsys):
    """The script's entry point (main_guard) on the command line: one line on stderr, exit code 2."""
    from flowmap.lightning.cli import main_guard

    monkeypatch.delenv("FLOWMAP_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["sample.py", str(clip_folder), "--n", "2", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(sample_script.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "clip_sample=True" in err and "--allow_clip_mismatch" in err
    assert not (tmp_path / "e").exists()
