"""Issue 18, fault injection: hostile files, bad inputs and fault stops on every entry point of scripts/*.

- A malicious pickle (its ``__reduce__`` writes a marker file) given to every entry point (``--teacher``,
  ``--resume PATH``, ``--resume last``, Lightning's ``hpc`` restore, ``load_student``, scripts/sample.py,
  scripts/export.py), with torch's old default forced by ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``: the marker
  is never created, the script exits with code 2 and one stderr line.
- A distillation resumed with another teacher refuses, naming both; ``--teacher_swap`` swaps and trains
  against the new teacher (the teacher is not in the checkpoint's state dict any more).
- A teacher with a NaN weight is refused at load (flowmap safetensors, Lightning .ckpt, diffusers folder).
- Bad paths and numbers fail before step 1 and leave nothing behind; a table of bad inputs across scripts/*
  each ends as exactly one stderr line and exit code 2; ``NonFiniteLossError`` and ``CorruptShardError`` too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from weights import trained_like

import flowmap
from flowmap.io import CheckpointError
from flowmap.lightning.cli import main_guard
from flowmap.models import save_student, save_teacher
from flowmap.nets import build_net
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity
from teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo as demo_script  # noqa: E402
import distill as distill_script  # noqa: E402
import export as export_script  # noqa: E402
import make_shards as make_shards_script  # noqa: E402
import sample as sample_script  # noqa: E402
import train_feature_net as feature_script  # noqa: E402
import train_teacher as teacher_script  # noqa: E402

NET = {"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8}
NET_YAML = "{name: mlp, data_shape: [2], width: 16, depth: 1, emb_dim: 8}"
QUICK = [
    "--config",
    str(ROOT / "configs/trainer/quick.yaml"),
    "--logger",
    "none",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.n_train",
    "512",
    "--data.init_args.batch_size",
    "64",
]
TEACHER = ["--config", str(ROOT / "configs/teacher/checkerboard.yaml"), *QUICK, "--model.net", NET_YAML]
DISTILL = [
    *(
        x
        for c in ("data/checkerboard", "model/mlp2d", "distill/cd")
        for x in ("--config", str(ROOT / f"configs/{c}.yaml"))
    ),
    *QUICK,
    "--model.student",
    f"{{net: {NET_YAML}}}",
]


class Payload:
    """Unpickling this object runs ``exec`` on code that writes ``marker`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code from the file ran')",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("faults")
    f = {"dir": d, "marker": d / "MARKER"}
    f["teacher_a"] = save_teacher(
        d / "teacher_a.safetensors", NetVelocity(trained_like(build_net(NET), 1), "linear", "velocity")
    )
    f["teacher_b"] = save_teacher(
        d / "teacher_b.safetensors", NetVelocity(trained_like(build_net(NET), 2), "linear", "velocity")
    )
    nan_net = trained_like(build_net(NET), 3)
    with torch.no_grad():
        next(nan_net.parameters()).view(-1)[0] = float("nan")
    f["teacher_nan"] = save_teacher(d / "teacher_nan.safetensors", NetVelocity(nan_net, "linear", "velocity"))
    f["student"] = save_student(d / "student.safetensors", FlowMap(trained_like(build_net(NET), 4)))
    net = build_net(NET)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, d / "garbled.safetensors", metadata={"flowmap_config": '{"format": "flowmap", "kind": "stud'})
    f["garbled"] = d / "garbled.safetensors"
    evil = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"net": NET},
        "pytorch-lightning_version": "2.6.0",
        "global_step": 1,
        "callbacks": Payload(f["marker"]),
    }
    for name in ("evil.ckpt", "evil.safetensors", "evil.pt"):
        torch.save(evil, d / name)
    f["evil_ckpt"], f["evil_st"], f["evil_pt"] = d / "evil.ckpt", d / "evil.safetensors", d / "evil.pt"
    f["text"] = d / "notes.ckpt"
    f["text"].write_text("not a checkpoint\n")
    f["regular"] = d / "a_regular_file"
    f["regular"].write_text("x")
    f["folder"] = d / "a_folder"
    f["folder"].mkdir()
    f["shards"] = d / "no_such_shards"
    return f


@pytest.fixture
def old_torch_default(monkeypatch):
    """torch's pre-2.6 default (unpickle anything) forced through the environment, as the issue reproduced it."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("FLOWMAP_DEBUG", raising=False)


def _guarded(capsys, main, args: list[str]) -> tuple[int, list[str], str]:
    """(exit code, non-empty stderr lines, stdout) of ``main(args)`` run through ``main_guard``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: main(args))
    out = capsys.readouterr()
    return exit_info.value.code, [line for line in out.err.splitlines() if line.strip()], out.out


def _one_line(capsys, main, args: list[str], match: str) -> str:
    code, err, _ = _guarded(capsys, main, args)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and match in err[0] and "Traceback" not in err[0], err[0]
    return err[0]


# --- code execution --------------------------------------------------------------------------------------
def test_payload_is_live_under_the_forced_old_default(files, old_torch_default, tmp_path):
    """Control: the file really runs code when torch.load is left to the environment's default."""
    marker = tmp_path / "control"
    torch.save({"x": Payload(marker)}, tmp_path / "control.ckpt")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(tmp_path / "control.ckpt")
    assert marker.read_text() == "code from the file ran"


def test_malicious_pickle_on_every_entry_point_never_runs(files, old_torch_default, capsys, tmp_path):
    run = tmp_path / "run"
    planted = run / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(files["evil_ckpt"].read_bytes())
    evil, evil_st = str(files["evil_ckpt"]), str(files["evil_st"])
    cases = [  # (script, arguments, the file the line must name, what it must say)
        (distill_script.main, [*DISTILL, "--teacher", evil, "--run_dir", str(tmp_path / "r1")], evil, "refused"),
        (teacher_script.main, [*TEACHER, "--run_dir", str(tmp_path / "r2"), "--resume", evil], evil, "refused"),
        (
            distill_script.main,
            [*DISTILL, "--teacher", str(files["teacher_a"]), "--run_dir", str(tmp_path / "r3"), "--resume", evil],
            evil,
            "refused",
        ),
        (teacher_script.main, [*TEACHER, "--run_dir", str(run), "--resume", "last"], str(planted), "refused"),
        (teacher_script.main, [*TEACHER, "--run_dir", str(run), "--resume", "auto"], str(planted), "refused"),
        (sample_script.main, [evil_st, "--out", str(tmp_path / "s")], evil_st, "none of its code was run"),
        (export_script.main, [evil_st, "--out", str(tmp_path / "g.pt2")], evil_st, "not a safetensors checkpoint"),
        (export_script.main, [str(files["evil_pt"])], str(files["evil_pt"]), "pickle-based and are never loaded"),
    ]
    for main, args, path, match in cases:
        line = _one_line(capsys, main, args, match)
        assert line.startswith(f"error: {path}: "), line  # the line names the file
    for path in (files["evil_ckpt"], files["evil_st"]):
        with pytest.raises(CheckpointError):
            flowmap.load_student(path)
    assert not files["marker"].exists()
    assert not any(
        (tmp_path / r).exists() for r in ("r1", "r2", "r3", "s", "g.pt2")
    )  # refused before anything was written


def test_lightning_restores_only_through_the_policy_including_hpc(files, old_torch_default, tmp_path):
    """Lightning's ``hpc`` restore (SLURM) reads through AtomicCheckpointIO.load_checkpoint; Lightning's own
    CheckpointIO, under the same environment, runs the payload (the hole this closes)."""
    import lightning as L

    from flowmap.lightning.cli import AtomicCheckpointIO
    from flowmap.lightning.datamodules import ToyDataModule
    from flowmap.lightning.teacher_module import TeacherModule

    def fit(plugins, root: Path):
        root.mkdir()
        (root / "hpc_ckpt_1.ckpt").write_bytes(files["evil_ckpt"].read_bytes())
        trainer = L.Trainer(
            max_steps=1,
            default_root_dir=str(root),
            plugins=plugins,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(TeacherModule(net=NET), datamodule=ToyDataModule(n_train=64, batch_size=16), ckpt_path="hpc")

    with pytest.raises(CheckpointError, match=r"hpc_ckpt_1.ckpt: refused.*none of its code was run"):
        fit([AtomicCheckpointIO()], tmp_path / "ours")
    assert not files["marker"].exists()
    with pytest.raises(Exception):  # noqa: B017 (whatever fails after the payload ran)
        fit([], tmp_path / "lightning_default")
    assert files["marker"].exists()
    files["marker"].unlink()


def test_malicious_resume_in_a_real_process_is_one_line(files, tmp_path):
    """End to end in a fresh interpreter with the environment forcing torch's old default."""
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FLOWMAP_DEBUG", None)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/sample.py"), str(files["evil_st"]), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "evil.safetensors" in r.stderr
    assert not files["marker"].exists() and not (tmp_path / "s").exists()
    # --debug: the traceback instead of the line
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/sample.py"), str(files["text"]), "--debug"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "CheckpointError" in r.stderr


# --- resume with another teacher ---------------------------------------------------------------------------
def test_resume_with_another_teacher_refuses_or_swaps(files, capsys, tmp_path):
    from flowmap.io import fingerprint, read_state

    run = ["--run_dir", str(tmp_path / "run"), "--trainer.max_steps", "3"]
    first = distill_script.main([*DISTILL, "--teacher", str(files["teacher_a"]), *run])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "teacher" in k]  # the teacher is not in the state dict
    fp_a, fp_b = fingerprint(read_state(files["teacher_a"])[0]), fingerprint(read_state(files["teacher_b"])[0])
    assert fp_a != fp_b
    assert ckpt["flowmap_teacher"]["fingerprint"] == first.model.teacher_identity()["fingerprint"]
    assert ckpt["flowmap_teacher"]["source"] == str(files["teacher_a"])
    before = last.read_bytes()
    line = _one_line(
        capsys,
        distill_script.main,
        [*DISTILL, "--teacher", str(files["teacher_b"]), *run[:2], "--trainer.max_steps", "5", "--resume", "last"],
        "--resume",
    )
    assert "teacher_a.safetensors" in line and "teacher_b.safetensors" in line and "--teacher_swap" in line
    assert last.read_bytes() == before
    # the same teacher resumes; --teacher_swap continues with the new one, says so, and trains against it
    _one_line(
        capsys,
        distill_script.main,
        [
            *DISTILL,
            "--teacher",
            str(files["teacher_a"]),
            *run[:2],
            "--resume",
            "last",
            "--model.student",
            "{net: {name: mlp, data_shape: [2], width: 8, depth: 1}}",
        ],
        "--resume: the checkpoint does not fit this run's networks (shape mismatch",
    )
    same = distill_script.main(
        [*DISTILL, "--teacher", str(files["teacher_a"]), *run[:2], "--trainer.max_steps", "4", "--resume", "last"]
    )
    assert same.trainer.global_step == 4
    swapped = distill_script.main(
        [
            *DISTILL,
            "--teacher",
            str(files["teacher_b"]),
            *run[:2],
            "--trainer.max_steps",
            "5",
            "--resume",
            "last",
            "--teacher_swap",
        ]
    )
    out = capsys.readouterr().out
    assert swapped.trainer.global_step == 5
    io = swapped.trainer.strategy.checkpoint_io  # Lightning restored through the policy's CheckpointIO, which took
    assert type(io).__name__ == "AtomicCheckpointIO" and io.preloaded is None  # the pre-flight's copy (no second read)
    assert sum(line.startswith("--teacher_swap: continuing the run with teacher") for line in out.splitlines()) == 1
    b_weights = read_state(files["teacher_b"])[0]
    used = swapped.model.teacher.teacher.net.state_dict()
    assert all(torch.equal(used[k], b_weights[k]) for k in b_weights)
    assert (
        torch.load(last, weights_only=True)["flowmap_teacher"]["fingerprint"]
        == swapped.model.teacher_identity()["fingerprint"]
    )


# --- NaN teacher --------------------------------------------------------------------------------------------
def test_nan_teacher_is_refused_at_load_for_every_kind(files, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensor"):
        load_teacher(files["teacher_nan"])
    from flowmap.lightning.teacher_module import TeacherModule

    module = TeacherModule(net=NET)
    state = module.state_dict()
    state["ema." + next(iter(module.ema.state_dict()))].view(-1)[0] = float("inf")
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, tmp_path / "inf.ckpt")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_teacher(tmp_path / "inf.ckpt")
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
    with torch.no_grad():
        unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=50, clip_sample=False).save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_teacher(tmp_path / "unet")
    # through the script: one line, and the student never gets the NaNs (nothing runs)
    _one_line(
        capsys,
        distill_script.main,
        [*DISTILL, "--teacher", str(files["teacher_nan"]), "--run_dir", str(tmp_path / "r")],
        "teacher_nan.safetensors: the teacher's weights hold NaN",
    )
    assert not (tmp_path / "r").exists()


# --- pre-flight: nothing written before the checks pass ------------------------------------------------------
def test_bad_export_or_run_dir_fails_before_step_one(files, capsys, tmp_path):
    run = tmp_path / "run"
    for bad, match in (
        (["--export", str(files["regular"] / "t.safetensors")], "is a regular file, not a folder"),
        (["--export", "/proc/flowmap_faults/t.safetensors"], "cannot write in /proc"),
        (["--export", str(files["folder"])], "is a folder, not a file path"),
        (["--trainer.max_steps", "0", "--export", str(tmp_path / "t.safetensors")], "max_steps must be a positive"),
    ):
        _one_line(capsys, teacher_script.main, [*TEACHER, "--run_dir", str(run), *bad], match)
        assert not run.exists() and not (tmp_path / "t.safetensors").exists()
    _one_line(capsys, teacher_script.main, [*TEACHER, "--run_dir", str(files["regular"] / "run")], "is a regular file")
    assert files["regular"].read_text() == "x"
    assert list(files["folder"].iterdir()) == []


# --- one line, exit 2, over a table of bad inputs -------------------------------------------------------------
def _bad_inputs(f: dict[str, Path], tmp: Path) -> list[tuple[str, object, list[str], str]]:
    r = ["--run_dir", str(tmp / "run")]
    return [
        ("max_steps negative", teacher_script.main, [*TEACHER, *r, "--trainer.max_steps", "-5"], "got -5"),
        ("max_steps zero", teacher_script.main, [*TEACHER, *r, "--trainer.max_steps", "0"], "got 0"),
        ("ckpt_every zero", teacher_script.main, [*TEACHER, *r, "--ckpt_every", "0"], "--ckpt_every"),
        (
            "data shape",
            teacher_script.main,
            [*TEACHER, *r, "--model.net", "{name: mlp, data_shape: [3], width: 8}"],
            "has samples of shape (2,), the network expects (3,)",
        ),
        (
            "resume missing",
            teacher_script.main,
            [*TEACHER, *r, "--resume", str(tmp / "nope.ckpt")],
            "no checkpoint file",
        ),
        ("resume last none", teacher_script.main, [*TEACHER, *r, "--resume", "last"], "--resume last: no checkpoint"),
        ("resume text", teacher_script.main, [*TEACHER, *r, "--resume", str(f["text"])], "not a PyTorch file"),
        (
            "resume safetensors",
            teacher_script.main,
            [*TEACHER, *r, "--resume", str(f["student"])],
            "a safetensors file; expected",
        ),
        ("unknown logger", teacher_script.main, [*TEACHER, *r, "--logger", "nonsense"], "unknown logger"),
        ("unknown key", teacher_script.main, [*TEACHER, *r, "--model.not_a_key", "1"], "not_a_key"),
        ("missing config", teacher_script.main, ["--config", str(tmp / "none.yaml"), *r], "none.yaml"),
        (
            "teacher missing",
            distill_script.main,
            [*DISTILL, *r, "--teacher", str(tmp / "nope.safetensors")],
            "no such file",
        ),
        ("teacher no path", distill_script.main, [*DISTILL, *r, "--teacher"], "--teacher needs a path"),
        ("teacher is student", distill_script.main, [*DISTILL, *r, "--teacher", str(f["student"])], "not a teacher"),
        ("teacher text", distill_script.main, [*DISTILL, *r, "--teacher", str(f["text"])], "not a checkpoint"),
        ("sample missing", sample_script.main, [str(tmp / "nope.safetensors")], "no such file or folder"),
        ("sample garbled config", sample_script.main, [str(f["garbled"])], "metadata is not valid JSON"),
        ("sample n zero", sample_script.main, [str(f["student"]), "--n", "0"], "--n must be at least 1"),
        ("sample steps zero", sample_script.main, [str(f["student"]), "--steps", "0"], "--steps must be at least 1"),
        ("sample gamma", sample_script.main, [str(f["student"]), "--gamma", "2"], "--gamma must lie in [0, 1]"),
        ("sample n not int", sample_script.main, [str(f["student"]), "--n", "many"], "invalid int value: 'many'"),
        ("sample no args", sample_script.main, [], "the following arguments are required: checkpoint"),
        (
            "sample out under file",
            sample_script.main,
            [str(f["student"]), "--n", "4", "--out", str(f["regular"] / "s")],
            "a_regular_file",
        ),
        ("export missing", export_script.main, [str(tmp / "nope.safetensors")], "no such checkpoint file"),
        ("export teacher", export_script.main, [str(f["teacher_a"])], "a teacher checkpoint, not a student"),
        ("export garbled", export_script.main, [str(f["garbled"])], "not valid JSON"),
        ("export batch", export_script.main, [str(f["student"]), "--batch", "0"], "--batch must be at least 1"),
        (
            "shards kwargs",
            make_shards_script.main,
            ["--dataset", "checkerboard", "--kwargs", "{nope", "--out", str(tmp / "s")],
            "--kwargs must be a JSON object",
        ),
        (
            "shards unknown set",
            make_shards_script.main,
            ["--dataset", "no_such_set", "--out", str(tmp / "s")],
            "no_such_set",
        ),
        (
            "shards bytes",
            make_shards_script.main,
            ["--dataset", "checkerboard", "--max-bytes", "12XB", "--out", str(tmp / "s")],
            "cannot read a byte size from '12XB'",
        ),
        ("shards no source", make_shards_script.main, ["--out", str(tmp / "s")], "one of the arguments"),
        ("features out", feature_script.main, ["--out", str(tmp / "f.txt")], "--out must name a .safetensors file"),
        ("demo method", demo_script.main, ["--method", "nope", "--out", str(tmp / "demo")], "unknown method 'nope'"),
    ]


def test_bad_inputs_are_one_line_exit_2(files, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWMAP_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    table = _bad_inputs(files, tmp_path)
    assert len(table) >= 25
    failures = []
    for name, main, args, match in table:
        code, err, _ = _guarded(capsys, main, args)
        if code != 2 or len(err) != 1 or not err[0].startswith("error: ") or match not in err[0]:
            failures.append((name, code, err[-3:]))
    assert not failures, failures
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists() and not (tmp_path / "demo").exists()


def test_garbled_student_config_is_a_checkpoint_error(files):
    with pytest.raises(CheckpointError, match="garbled.safetensors: the flowmap_config metadata is not valid JSON"):
        flowmap.load_student(files["garbled"])
    state = {k: v.contiguous() for k, v in build_net(NET).state_dict().items()}
    save_file(state, files["dir"] / "list.safetensors", metadata={"flowmap_config": '["student"]'})
    with pytest.raises(CheckpointError, match="list.safetensors: the flowmap_config metadata is not a JSON object"):
        flowmap.load_student(files["dir"] / "list.safetensors")


# --- fault stops ------------------------------------------------------------------------------------------------
def test_fault_stops_are_one_line(files, capsys, tmp_path):
    """NonFiniteLossError (a learning rate that overflows the weights) and CorruptShardError (every shard
    garbled) stop the run with one error line and exit code 2, not a traceback."""
    code, err, _ = _guarded(
        capsys,
        teacher_script.main,
        [
            *TEACHER,
            "--run_dir",
            str(tmp_path / "nan"),
            "--model.lr",
            "1e38",
            "--model.warmup_steps",
            "0",
            "--model.max_nonfinite",
            "2",
        ],
    )
    # the guard reads its device-side counter every min(max_nonfinite, log_every_n_steps) steps: it stops at >= 2
    stop = re.match(r"error: (\d+) training steps in a row had a non-finite loss", err[-1])
    assert code == 2 and stop is not None and int(stop.group(1)) >= 2, err
    assert sum(line.startswith("error:") for line in err) == 1 and not any("Traceback" in line for line in err)

    from flowmap.data import get_dataset
    from flowmap.data.shards import write_source_shards

    shards = tmp_path / "shards"
    index = write_source_shards(get_dataset("checkerboard", n_train=64, n_val=1), shards, max_count=32)
    g = torch.Generator().manual_seed(0)
    for path in index.paths:
        path.write_bytes(
            torch.randint(0, 256, (path.stat().st_size,), generator=g, dtype=torch.uint8).numpy().tobytes()
        )
    data = [
        "--data",
        "flowmap.lightning.streaming.ShardDataModule",
        "--data.init_args.root",
        str(shards),
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.epoch_length",
        "4",
        "--data.init_args.shuffle_buffer",
        "0",
    ]
    code, err, _ = _guarded(
        capsys,
        teacher_script.main,
        [
            "--config",
            str(ROOT / "configs/teacher/checkerboard.yaml"),
            "--config",
            str(ROOT / "configs/trainer/quick.yaml"),
            "--logger",
            "none",
            "--model.net",
            NET_YAML,
            *data,
            "--run_dir",
            str(tmp_path / "cs"),
        ],
    )
    assert (
        code == 2
        and err[-1].startswith("error: ")
        and ("were damaged or missing" in err[-1] or "no readable sample" in err[-1])
        and str(shards) in err[-1]
    ), err
    assert sum(line.startswith("error:") for line in err) == 1 and not any("Traceback" in line for line in err)
    # raised in a DataLoader worker, torch re-raises it with the worker's traceback in the message: still one line
    from torch._utils import ExceptionWrapper

    from flowmap.data.shards import CorruptShardError

    def worker_failure(args):
        try:
            raise CorruptShardError("12 of 40 samples read from 'data/cb' were damaged or missing")
        except CorruptShardError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    _one_line(capsys, worker_failure, [], "error: 12 of 40 samples read from 'data/cb' were damaged or missing")


def test_checkpoint_of_an_older_version_with_the_teacher_inside(files):
    """Checkpoints written before the fix held the teacher under ``_teacher.*``: they resume with the same
    teacher (its tensors identify it and are dropped, not loaded) and refuse another one."""
    from flowmap.lightning.distill_module import DistillModule
    from teachers import CheckpointTeacher

    def module(teacher: str) -> DistillModule:
        return DistillModule(
            student={"net": NET}, objective={"name": "cd"}, teacher=CheckpointTeacher(str(files[teacher]))
        )

    a = module("teacher_a")
    assert not any("teacher" in k for k in a.state_dict())
    teacher_state = {f"_teacher.{k}": v for k, v in a.teacher.state_dict().items()}
    old = {"state_dict": {**a.state_dict(), **teacher_state}, "flowmap_run": a.run_identity()}
    assert a.check_resume(old) is None
    with pytest.raises(
        ValueError, match=r"trained with teacher the teacher stored in the checkpoint .*teacher_b.safetensors"
    ):
        module("teacher_b").check_resume(old)
    a.on_load_checkpoint(old)
    a.load_state_dict(old["state_dict"], strict=True)  # the teacher's tensors were dropped
