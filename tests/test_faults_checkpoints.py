"""Faults around checkpoints and artefacts (issue 18, holes 4, 5, 10, 11), with real faults injected:

- kill -9 of a training process during a checkpoint write at a random step, and at a random step between writes,
  for a teacher and for progressive distillation (mid-round); ``--resume last`` then ends with exactly (torch.equal)
  the weights and optimizer state of an uninterrupted run, and the killed write's temporary file is removed at the
  next start;
- an export path that becomes unwritable during training: the run fails with one line naming ``last.ckpt``, which
  holds the final step's weights;
- ``last.ckpt`` is the newest state at the end of a run whose last step falls between periodic saves, and after a
  resume with another ``--ckpt_every`` (no ``last-v1.ckpt``); 7 steps resumed to 11 equal an unbroken 11-step run;
- a resume from a checkpoint at an epoch's last batch goes on with the next epoch's data (exact, as above);
- checkpoints, exports and ``.pt2`` files get the process umask's mode (0o644 under 0o022, 0o600 under 0o077);
- stale temporary files of ours are removed at the next start, anything else is left alone.

The killed runs are subprocesses; the uninterrupted reference and the final resumes run in this process (one
thread everywhere, so the arithmetic is the same)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from test_resume import NET, _config, _run, shards  # noqa: F401 (shards is a fixture)

ROOT = Path(__file__).resolve().parents[1]
PD = "{name: pd, initial_steps: 8, steps_per_round: 4, solver: euler}"  # rounds start at steps 4, 8, 12
DISTILL = f"""  student: {{net: {NET}}}
  objective: {PD}
  teacher: {{class_path: teachers.PresetMixture, init_args: {{name: grid4}}}}"""
TEACHER = f"  net: {NET}"


class Ballast(L.Callback):
    """Adds ``megabytes`` of zeros to the checkpoints of global step ``step`` only: that write then lasts long
    enough to be caught from outside (the training itself is unchanged)."""

    def __init__(self, step: int, megabytes: int = 64) -> None:
        self.step = step
        self.megabytes = megabytes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            checkpoint["test_ballast"] = torch.zeros(self.megabytes << 18)


class BlockExport(L.Callback):
    """After step 1, puts a regular file where the export's parent folder should be (a path that turns unwritable
    during training); records the module's state at the end of training in ``FINAL``."""

    FINAL: ClassVar[dict] = {}

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            Path(self.path).write_text("not a folder")

    def on_train_end(self, trainer, pl_module) -> None:
        BlockExport.FINAL = {
            "step": trainer.global_step,
            "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
        }


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def _assert_same_run(a: dict, b: dict, what: str) -> None:
    """Two checkpoints hold the same step, weights and optimizer state, to the bit."""
    assert a["global_step"] == b["global_step"], what
    sa, sb = a["state_dict"], b["state_dict"]
    assert set(sa) == set(sb), what
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{what}: weights differ in {differ[:5]}"
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert set(oa) == set(ob) and len(oa) > 0, what
    differ = [
        (i, k) for i in oa for k in oa[i] if not torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k]))
    ]
    assert not differ, f"{what}: optimizer state differs in {differ[:5]}"


def _spawn(script: str, config: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """The script in a subprocess (one thread, output to a file: a full pipe would stall it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    log = run_dir.parent / f"{run_dir.name}_{time.monotonic_ns()}.log"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / f"{script}.py"),
        "--config",
        str(config),
        "--run_dir",
        str(run_dir),
        "--logger",
        "none",
        "--ckpt_every",
        "1",
        *extra,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)), log


def _kill_when(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every half millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _temps(folder: Path, target: str) -> list[str]:
    """Our temporary files for ``target`` in ``folder`` (``.<target>.<8 random>.tmp``)."""
    try:
        return [n for n in os.listdir(folder) if n.startswith(f".{target}.") and n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _kill_mid_write(script: str, config: Path, run_dir: Path, step: int, *extra: str, attempts: int = 3) -> str:
    """Kill the run while it writes the checkpoint of ``step``; returns the temporary file it leaves. A kill that
    lands after the write (a starved machine) is retried in a fresh run folder."""
    target = f"step{step:07d}.ckpt"
    ballast = json.dumps([{"class_path": "test_faults_checkpoints.Ballast", "init_args": {"step": step}}])
    for _ in range(attempts):
        shutil.rmtree(run_dir, ignore_errors=True)
        proc, log = _spawn(script, config, run_dir, "--trainer.callbacks", ballast, *extra)
        _kill_when(proc, log, lambda: _temps(run_dir / "checkpoints", target), f"the write of {target}")
        left = _temps(run_dir / "checkpoints", target)
        if len(left) == 1:
            break
    assert len(left) == 1, f"the kill did not land inside the write of {target} in {attempts} attempts: {left}"
    assert not (run_dir / "checkpoints" / target).exists()
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step - 1  # the previous one, intact
    return left[0]


def _kill_at_step(script: str, config: Path, run_dir: Path, step: int, *extra: str) -> None:
    """Kill the run once the checkpoint of ``step`` is complete (during the next step or the last.ckpt write)."""
    proc, log = _spawn(script, config, run_dir, *extra)
    _kill_when(proc, log, lambda: (run_dir / "checkpoints" / f"step{step:07d}.ckpt").exists(), f"step {step}")
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] in (step - 1, step)  # a whole file


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill9_mid_write_then_resume_is_exact_teacher(tmp_path, shards):  # noqa: F811
    """Teacher: SIGKILL inside the write of a random step's checkpoint; the resumed run equals an unbroken one."""
    total, seed = 10, random.randrange(2**31)
    step = random.Random(seed).randint(3, total - 2)
    config = _config(tmp_path, "teacher", shards, None, TEACHER)
    steps = ("--trainer.max_steps", str(total))
    _run("train_teacher", config, tmp_path / "full", "--ckpt_every", "5", *steps)
    left = _kill_mid_write("train_teacher", config, tmp_path / "run", step, *steps)
    _run("train_teacher", config, tmp_path / "run", "--ckpt_every", "1", "--resume", "last", *steps)
    assert not (tmp_path / "run" / "checkpoints" / left).exists(), "the killed write's temporary file is still there"
    _assert_same_run(
        _load(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _load(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        f"teacher killed at step {step} (seed {seed})",
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill9_mid_round_then_resume_is_exact_progressive_distillation(tmp_path, shards):  # noqa: F811
    """Progressive distillation killed twice: inside a checkpoint write in round 1, then (resumed) at a random step
    of round 2, neither at a round boundary; the final resume equals an unbroken run, round teacher included."""
    total, seed = 14, random.randrange(2**31)
    rng = random.Random(seed)
    first, second = rng.randint(5, 7), rng.randint(9, 11)
    config = _config(tmp_path, "pd", shards, None, DISTILL)
    steps = ("--trainer.max_steps", str(total))
    _run("distill", config, tmp_path / "full", "--ckpt_every", "7", *steps)
    left = _kill_mid_write("distill", config, tmp_path / "run", first, *steps)
    _kill_at_step("distill", config, tmp_path / "run", second, "--resume", "last", *steps)
    assert not (tmp_path / "run" / "checkpoints" / left).exists(), "the killed write's temporary file is still there"
    _run("distill", config, tmp_path / "run", "--ckpt_every", "1", "--resume", "last", *steps)
    full, resumed = (
        _load(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _load(tmp_path / "run" / "checkpoints" / "last.ckpt"),
    )
    _assert_same_run(full, resumed, f"pd killed at steps {first} and {second} (seed {seed})")
    assert int(resumed["state_dict"]["objective.snapshot_round"]) == 3
    assert any(k.startswith("objective.round_teacher.") for k in resumed["state_dict"])


@pytest.mark.timeout(300)
def test_last_ckpt_is_the_newest_state_at_the_end_and_after_a_resume_with_another_period(tmp_path, shards):  # noqa: F811
    """A run whose last step falls between periodic saves ends with last.ckpt at that step; a resume with another
    --ckpt_every and more steps overwrites last.ckpt (no last-v1.ckpt beside a stale last.ckpt) and goes on exactly
    as an unbroken run of that length."""
    config, run = _config(tmp_path, "teacher", shards, None, TEACHER), tmp_path / "run"
    folder = run / "checkpoints"
    for every, total in ((3, 7), (2, 11)):  # periodic saves at 3, 6, then (resumed) at 8, 10
        resume = ("--resume", "last") if total == 11 else ()
        cli = _run("train_teacher", config, run, "--ckpt_every", str(every), "--trainer.max_steps", str(total), *resume)
        last = _load(folder / "last.ckpt")
        assert last["global_step"] == total == cli.trainer.global_step
        state = cli.model.state_dict()
        assert set(last["state_dict"]) == set(state) and all(
            torch.equal(v, state[k]) for k, v in last["state_dict"].items()
        )
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt"] + [f"step{s:07d}.ckpt" for s in (3, 6, 8, 10)]
    _run("train_teacher", config, tmp_path / "full", "--ckpt_every", "5", "--trainer.max_steps", "11")
    _assert_same_run(_load(tmp_path / "full" / "checkpoints" / "last.ckpt"), last, "7 steps, then 4 more")


@pytest.mark.timeout(300)
def test_an_export_failing_at_the_end_keeps_the_final_checkpoint(tmp_path, shards, capsys):  # noqa: F811
    """The export's folder turns into a regular file during training: the run ends with one error line naming
    last.ckpt (exit code 2), and last.ckpt holds the final step's weights."""
    from flowmap.lightning.cli import main_guard

    config, run, blocked = _config(tmp_path, "teacher", shards, None, TEACHER), tmp_path / "run", tmp_path / "out"
    callbacks = json.dumps([{"class_path": "test_faults_checkpoints.BlockExport", "init_args": {"path": str(blocked)}}])
    args = ("--ckpt_every", "4", "--trainer.max_steps", "6", "--export", str(blocked / "teacher.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: _run("train_teacher", config, run, *args, "--trainer.callbacks", callbacks))
    assert exit_info.value.code == 2 and blocked.is_file()
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"the trained weights are saved in {run / 'checkpoints' / 'last.ckpt'}" in lines[0], (
        lines
    )
    last, final = _load(run / "checkpoints" / "last.ckpt"), BlockExport.FINAL
    assert last["global_step"] == final["step"] == 6  # not the periodic save of step 4
    assert set(last["state_dict"]) == set(final["state"])
    assert all(torch.equal(v, final["state"][k]) for k, v in last["state_dict"].items())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_artefacts_are_written_with_the_process_umask(tmp_path, shards, umask, mode):  # noqa: F811
    """Checkpoints, the export, a student file and a .pt2 program: mode 0o666 & ~umask (mkstemp's 0o600 before)."""
    from flowmap.export import export_generator
    from flowmap.models import save_student
    from flowmap.nets import build_net
    from flowmap.student import FlowMap

    config, run = _config(tmp_path, "teacher", shards, None, TEACHER), tmp_path / "run"
    before = os.umask(umask)
    try:
        _run("train_teacher", config, run, "--trainer.max_steps", "2", "--export", str(run / "teacher.safetensors"))
        student = FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": 8, "depth": 1, "emb_dim": 8})).eval()
        save_student(run / "student.safetensors", student)
        export_generator(student, run / "generator.pt2", dynamic=False)
    finally:
        os.umask(before)
    files = [
        run / "checkpoints" / "last.ckpt",
        run / "checkpoints" / "step0000002.ckpt",
        run / "teacher.safetensors",
        run / "student.safetensors",
        run / "generator.pt2",
    ]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}
    assert not [p for p in run.rglob(".*.tmp*")]


@pytest.mark.timeout(300)
def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path, shards):  # noqa: F811
    """Temporary files of killed writes (ours: ``.<name>.<8 random>.tmp``) in the checkpoint folder, the run folder
    (hpc_ckpt) and next to the export are removed when a run starts; other files there are left alone."""
    config, run, out = _config(tmp_path, "teacher", shards, None, TEACHER), tmp_path / "run", tmp_path / "out"
    folder = run / "checkpoints"
    stale = [
        folder / ".last.ckpt.ab12cd34.tmp",
        folder / ".step0000004.ckpt.zz_9xy01.tmp",
        run / ".hpc_ckpt_1.ckpt.q1w2e3r4.tmp",
        out / ".teacher.safetensors.0a1b2c3d.tmp",
    ]
    kept = [
        folder / "notes.tmp",
        folder / ".last.ckpt.tmp",
        folder / ".notes.txt.ab12cd34.tmp",
        run / "data.ckpt",
        out / ".other.safetensors.abcdefgh.tmp",
        out / ".teacher.safetensors.abc.tmp",
        out / "teacher.tmp",
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    (folder / ".step0000009.ckpt.dddddddd.tmp").mkdir()  # a folder, not one of our files
    _run("train_teacher", config, run, "--trainer.max_steps", "2", "--export", str(out / "teacher.safetensors"))
    assert [p.name for p in stale if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == [] and (folder / ".step0000009.ckpt.dddddddd.tmp").is_dir()
    assert (out / "teacher.safetensors").is_file() and _load(folder / "last.ckpt")["global_step"] == 2


@pytest.mark.timeout(300)
def test_resume_from_an_epochs_last_batch_is_exact(tmp_path, shards):  # noqa: F811
    """A run stopped at the last batch of an epoch (step 6, epochs of 3 batches) and resumed goes on with the next
    epoch's data: the same weights as an unbroken run (it replayed the finished epoch, one epoch ahead, before)."""
    steps = ("--ckpt_every", "3", "--trainer.max_steps", "9")
    _run("train_teacher", _config(tmp_path, "teacher", shards, None, TEACHER), tmp_path / "full", *steps)
    _run("train_teacher", _config(tmp_path, "teacher", shards, 6, TEACHER), tmp_path / "run", *steps)
    assert _load(tmp_path / "run" / "checkpoints" / "last.ckpt")["ShardDataModule"] == {"epoch": 1, "consumed": 3}
    _run(
        "train_teacher",
        _config(tmp_path, "teacher", shards, None, TEACHER),
        tmp_path / "run",
        *steps,
        "--resume",
        "last",
    )
    _assert_same_run(
        _load(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _load(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        "resumed after the last batch of epoch 1",
    )
