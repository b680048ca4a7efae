"""Each wrong input to the checkpoint loaders gives one clear CheckpointError, and nothing in a
checkpoint is executed (issue 7). Also: our own Lightning .ckpt loads, with its EMA weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import flowmap
from flowmap.io import CheckpointError, save_model
from flowmap.models import save_student, save_teacher, teacher_config
from flowmap.nets import build_net
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity
from teachers import CheckpointTeacher, describe_teacher, load_teacher

MLP = {"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8}


def _record_side_effect(marker: str) -> None:
    Path(marker).write_text("code from the checkpoint ran")


class Payload:
    """Unpickling this object would call ``_record_side_effect`` (what a malicious checkpoint does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_record_side_effect, (self.marker,))


def test_pickle_bearing_ckpt_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "side_effect.txt"
    bad = tmp_path / "model.ckpt"
    net = build_net(MLP)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"net": MLP},
            "callbacks": Payload(str(marker)),
        },
        bad,
    )
    with pytest.raises(CheckpointError, match=r"refused.*weights_only=True.*none of its code was run"):
        load_teacher(bad)
    with pytest.raises(CheckpointError, match="only safetensors"):
        flowmap.load_student(bad)
    with pytest.raises(CheckpointError, match="refused"):
        CheckpointTeacher(str(bad))
    assert not marker.exists()
    # control: the payload is live, an unrestricted unpickler would have run it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint.*expected a flowmap teacher .safetensors file"):
        load_teacher(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_teacher(empty)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(3)}, plain)  # a PyTorch file, but not Lightning's layout
    with pytest.raises(CheckpointError, match="without Lightning's 'state_dict'"):
        load_teacher(plain)
    folder = tmp_path / "some_folder"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_teacher(folder)
    with pytest.raises(CheckpointError, match="no such file"):
        load_teacher(tmp_path / "missing.safetensors")


def test_checkpoint_for_another_architecture(tmp_path):
    small = build_net(MLP)
    wide = dict(MLP, width=32)
    # safetensors whose config says width 32 but whose weights are width 16
    teacher = NetVelocity(small, "linear", "velocity")
    cfg = dict(teacher_config(teacher), net=wide)
    path = save_model(tmp_path / "teacher.safetensors", small, cfg)
    with pytest.raises(CheckpointError, match="does not fit the network: .*shape mismatch"):
        load_teacher(path)
    # the same for a Lightning-layout checkpoint and for a student
    ckpt = tmp_path / "teacher.ckpt"
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in small.state_dict().items()}, "hyper_parameters": {"net": wide}}, ckpt
    )
    with pytest.raises(CheckpointError, match="does not fit the network"):
        load_teacher(ckpt)
    mlp3 = build_net(dict(MLP, depth=3))
    spath = save_model(
        tmp_path / "student.safetensors", mlp3, {"kind": "student", "net": MLP, "parametrization": {"name": "identity"}}
    )
    with pytest.raises(CheckpointError, match="does not fit the network: unexpected"):
        flowmap.load_student(spath)
    unknown = save_model(
        tmp_path / "unknown.safetensors", small, dict(teacher_config(teacher), net={"name": "resnet9000"})
    )
    with pytest.raises(CheckpointError, match="unknown net"):
        load_teacher(unknown)


def test_wrong_kind_of_flowmap_checkpoint(tmp_path):
    student = save_student(tmp_path / "student.safetensors", FlowMap(build_net(MLP)))
    with pytest.raises(CheckpointError, match="student checkpoint, not a teacher"):
        load_teacher(student)
    distill = tmp_path / "distill.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"student": {"net": MLP}, "objective": {"name": "cd"}}}, distill)
    with pytest.raises(CheckpointError, match="DistillModule"):
        load_teacher(distill)


def test_our_lightning_ckpt_loads_with_ema_weights(tmp_path):
    """A TeacherModule checkpoint (Lightning's layout: state_dict + hyper_parameters) rebuilds the
    teacher from hyper_parameters with the EMA weights; the safetensors export loads the same way."""
    from flowmap.lightning.teacher_module import TeacherModule

    module = TeacherModule(net=MLP, path="cosine", prediction="eps")
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6",
            "global_step": 3,
        },
        ckpt,
    )
    teacher, d = load_teacher(ckpt)
    assert (d["kind"], d["weights"], d["prediction"], d["path"], d["data_shape"]) == (
        "lightning",
        "ema",
        "eps",
        "cosine",
        [2],
    )
    assert "lightning mlp: prediction eps, path cosine" in describe_teacher(d)
    x, t = torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05
    with torch.no_grad():
        v = teacher.velocity(x, t)
        assert torch.equal(v, module.teacher(use_ema=True).velocity(x, t))
        assert float((v - module.teacher(use_ema=False).velocity(x, t)).abs().max()) > 1e-4
        st, d_st = load_teacher(save_teacher(tmp_path / "t.safetensors", module.teacher()))
        assert d_st["kind"] == "safetensors" and torch.equal(st.velocity(x, t), v)


def test_diffusers_folders_with_unsupported_parts(tmp_path):
    diffusers = pytest.importorskip("diffusers")
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

    def folder(name: str, scheduler=None, edit: dict | None = None, safe: bool = True) -> Path:
        d = tmp_path / name
        unet.save_pretrained(d, safe_serialization=safe)
        if scheduler is not None:
            scheduler.save_pretrained(d)
        if edit:
            cfg = json.loads((d / "scheduler_config.json").read_text())
            (d / "scheduler_config.json").write_text(json.dumps({**cfg, **edit}))
        return d

    # refused in one line naming the scheduler: "no training betas", or, where this diffusers cannot build it at
    # all, "could not build ScoreSdeVeScheduler"
    with pytest.raises(CheckpointError, match="ScoreSdeVeScheduler"):
        sde_ve = {
            "_class_name": "ScoreSdeVeScheduler",
            "num_train_timesteps": 2000,
            "sigma_min": 0.01,
            "sigma_max": 1348.0,
        }
        d = folder("sde_ve")  # written by hand: this diffusers' ScoreSdeVeScheduler() fails in its own __init__
        (d / "scheduler_config.json").write_text(json.dumps(sde_ve))
        load_teacher(d)  # EDM schedulers: tests/test_edm_folder_teacher
    with pytest.raises(CheckpointError, match="prediction_type='flow_prediction' is not supported"):
        load_teacher(
            folder("pred", diffusers.DDPMScheduler(num_train_timesteps=50), edit={"prediction_type": "flow_prediction"})
        )
    with pytest.raises(CheckpointError, match="rescale_betas_zero_snr"):
        load_teacher(folder("zsnr", diffusers.DDIMScheduler(num_train_timesteps=50, rescale_betas_zero_snr=True)))
    with pytest.raises(CheckpointError, match="no scheduler config"):
        load_teacher(folder("nosched"))
    with pytest.raises(CheckpointError, match="only safetensors weights"):
        load_teacher(folder("pickled", diffusers.DDIMScheduler(num_train_timesteps=50), safe=False))
    other = tmp_path / "vae"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=1).save_pretrained(other)
    with pytest.raises(CheckpointError, match="unsupported diffusers model class 'AutoencoderKL'"):
        load_teacher(other)
    ok, d = load_teacher(
        folder(
            "ddpm_sample", diffusers.DDPMScheduler(num_train_timesteps=50, prediction_type="sample", clip_sample=False)
        )
    )
    assert d["prediction"] == "x0" and d["scheduler"] == "DDPMScheduler"
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # an x0-predicting model's velocity stays finite at the data end (Heun's last stage)
        assert (
            torch.isfinite(ok.velocity(x, torch.zeros(2))).all() and torch.isfinite(ok.velocity(x, torch.ones(2))).all()
        )


def test_missing_diffusers_gives_a_clear_import_error(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (folder / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 10})
    )
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match="optional dependency `diffusers`"):
        load_teacher(folder)
