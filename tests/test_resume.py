"""Exact resume, bf16 and the NaN guard.

- A CLI run stopped at step N (a callback ends it, as a preemption would after its checkpoint) and resumed with
  ``--resume last`` ends with exactly the weights of an uninterrupted run (torch.equal on the whole state dict:
  network, EMA, target, progressive distillation's round teacher), for the teacher and for a distillation
  method with round state (pd; cd if pd is missing). Data stream from shards, and the stop falls mid-epoch.
- ``--trainer.precision bf16-mixed`` trains and stays finite; JVP objectives get float32 tangents although
  autocast is on.
- Non-finite batches are skipped and counted (``train/skipped_steps``); K in a row stop with a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

NET = "{name: mlp, data_shape: [2], width: 16, depth: 2, emb_dim: 16}"
TOTAL, STOP = (
    8,
    5,
)  # uninterrupted steps; the interrupted run ends after step STOP (last.ckpt: step STOP, saved at the end)


class StopAt(L.Callback):
    """Ends training after ``step`` optimizer steps (a stand-in for a preemption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from flowmap.data import get_dataset
    from flowmap.data.shards import write_source_shards

    root = tmp_path_factory.mktemp("resume") / "cb"
    write_source_shards(get_dataset("checkerboard", n_train=256, n_val=1), root, max_count=32)
    return root


def _config(tmp_path: Path, kind: str, shards: Path, stop: int | None, extra_model: str = "", workers: int = 0) -> Path:
    callbacks = f"\n  callbacks:\n  - class_path: test_resume.StopAt\n    init_args: {{step: {stop}}}" if stop else ""
    text = f"""seed_everything: 0
model:
{extra_model}
  lr: 0.01
  ema_decay: 0.8
data:
  class_path: flowmap.lightning.streaming.ShardDataModule
  init_args: {{root: {shards}, batch_size: 16, epoch_length: 3, shuffle_buffer: 32, num_workers: {workers}, seed: 1}}
trainer:
  max_steps: {TOTAL}
  enable_progress_bar: false
  enable_model_summary: false{callbacks}
"""
    path = tmp_path / f"{kind}_{stop or 'full'}.yaml"
    path.write_text(text)
    return path


def _run(script: str, config: Path, run_dir: Path, *extra: str):
    module = __import__(script)
    cli = module.main(
        ["--config", str(config), "--run_dir", str(run_dir), "--logger", "none", "--ckpt_every", "2", *extra]
    )
    return cli


def _assert_exact_resume(tmp_path: Path, script: str, kind: str, model_yaml: str, shards: Path, workers: int = 0):
    full = _run(script, _config(tmp_path, kind, shards, None, model_yaml, workers), tmp_path / f"{kind}_a")
    part = _run(script, _config(tmp_path, kind, shards, STOP, model_yaml, workers), tmp_path / f"{kind}_b")
    assert full.trainer.global_step == TOTAL and part.trainer.global_step == STOP
    last = torch.load(tmp_path / f"{kind}_b" / "checkpoints" / "last.ckpt", weights_only=True)  # primitives only
    assert last["global_step"] == STOP and last["ShardDataModule"] == {"epoch": 1, "consumed": 2}  # mid-epoch
    resumed = _run(
        script, _config(tmp_path, kind, shards, None, model_yaml, workers), tmp_path / f"{kind}_b", "--resume", "last"
    )
    assert resumed.trainer.global_step == TOTAL
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{kind}: resumed weights differ from the uninterrupted run in {differ[:5]}"
    moved = [k for k in a if k in last["state_dict"] and not torch.equal(a[k], last["state_dict"][k])]
    assert moved, "the resumed run did not train"
    return a


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_teacher_resume_is_exact(tmp_path, shards):
    state = _assert_exact_resume(tmp_path, "train_teacher", "teacher", f"  net: {NET}", shards, workers=2)
    assert any(k.startswith("ema.") for k in state)


def _distill_method() -> str:
    from flowmap.objectives import build_objective

    for name in ("pd", "cd"):
        try:
            build_objective({"name": name})
            return name
        except Exception:
            continue
    pytest.skip("neither pd nor cd imports")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_distillation_resume_is_exact_including_round_state(tmp_path, shards):
    method = _distill_method()
    objective = (
        "{name: pd, initial_steps: 4, steps_per_round: 3, solver: euler, snapshot_halflife: 0.5}"
        if method == "pd"
        else "{name: cd}"
    )
    model = f"""  student: {{net: {NET}}}
  objective: {objective}
  teacher: {{class_path: teachers.PresetMixture, init_args: {{name: grid4}}}}"""
    state = _assert_exact_resume(tmp_path, "distill", method, model, shards)
    if method == "pd":  # rounds start at steps 3 and 6: the resumed part rebuilt one snapshot and took the next
        assert int(state["objective.snapshot_round"]) == 2
        assert any(k.startswith("objective.round_teacher.") for k in state)
        assert any(k.startswith("target.") for k in state)  # the weights' EMA that the next boundary snapshots
    else:
        assert any(k.startswith("target.") for k in state)


@pytest.mark.timeout(300)
def test_resuming_with_another_method_or_module_is_one_clear_error(tmp_path, shards, capsys):
    from flowmap.lightning.cli import main_guard

    def model(objective):
        return f"""  student: {{net: {NET}}}
  objective: {objective}
  teacher: {{class_path: teachers.PresetMixture, init_args: {{name: grid4}}}}"""

    _run("distill", _config(tmp_path, "cd", shards, 3, model("{name: cd}")), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["flowmap_run"] == {"kind": "DistillModule", "method": "cd"}
    before = last.read_bytes()
    for script, cfg in (
        ("distill", _config(tmp_path, "shortcut", shards, None, model("{name: shortcut}"))),
        ("train_teacher", _config(tmp_path, "teacher", shards, None, f"  net: {NET}")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main_guard(lambda: _run(script, cfg, tmp_path / "run", "--resume", "last"))
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()  # Lightning's own warnings may precede it
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], lines[-3:]
        assert errors[0].startswith("error: --resume: the checkpoint comes from a 'cd' run"), errors
    assert last.read_bytes() == before  # nothing overwritten


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.timeout(300)
def test_bf16_mixed_runs_finite_with_float32_jvps(tmp_path, shards, monkeypatch):
    import flowmap.jvp as engine  # jvp(..., with_grad=True) falls back under autocast to engine.jvp
    import flowmap.objectives.base as meanflow  # Objective.jvp calls the engine from there

    seen = []

    def recording_jvp(*args, **kwargs):
        out, tangent = jvp(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), tangent.dtype))
        return out, tangent

    jvp = meanflow.jvp
    monkeypatch.setattr(meanflow, "jvp", recording_jvp)
    monkeypatch.setattr(engine, "jvp", recording_jvp)
    model = f"""  student: {{net: {NET}}}
  objective: {{name: meanflow}}
  teacher: {{class_path: teachers.PresetMixture, init_args: {{name: grid4}}}}"""
    for script, kind, yaml in (("train_teacher", "teacher", f"  net: {NET}"), ("distill", "meanflow", model)):
        cli = _run(
            script,
            _config(tmp_path, kind, shards, None, yaml),
            tmp_path / f"bf16_{kind}",
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_steps",
            "4",
        )
        assert cli.trainer.global_step == 4 and cli.trainer.precision == "bf16-mixed"
        state = cli.model.state_dict()
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # fp32 master weights
        assert cli.model.nonfinite_total == 0
    assert len(seen) >= 4 and all(on and dtype == torch.float32 for on, dtype in seen), seen


class _ListData(L.LightningDataModule):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader([(x, torch.full((len(x),), -1, dtype=torch.long)) for x in self.batches], batch_size=None)


def _guard_run(tmp_path: Path, batches: list[torch.Tensor], max_nonfinite: int, steps: int):
    from lightning.pytorch.loggers import CSVLogger

    from flowmap.lightning.teacher_module import TeacherModule

    module = TeacherModule(
        net={"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 16}, max_nonfinite=max_nonfinite
    )
    trainer = L.Trainer(
        max_steps=steps,
        logger=CSVLogger(str(tmp_path), name="log", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return module, trainer


@pytest.mark.timeout(120)
def test_nan_guard_skips_counts_and_stops_after_k_in_a_row(tmp_path):
    from flowmap.lightning.training_mixin import NonFiniteLossError

    good = [torch.randn(8, 2) for _ in range(6)]
    nan = torch.full((8, 2), float("nan"))
    # two NaN batches among good ones: skipped and counted, weights stay finite, training goes on
    batches = [good[0], nan, good[1], nan, good[2], good[3]]
    module, trainer = _guard_run(tmp_path / "a", batches, max_nonfinite=2, steps=6)  # a skipped step still counts
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=_ListData(batches))
    assert trainer.global_step == 6 and module.nonfinite_total == 2 and module.nonfinite_in_a_row == 0
    assert all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
    header, *rows = (tmp_path / "a" / "log" / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("train/skipped_steps")
    assert max(float(r.split(",")[col]) for r in rows if r.split(",")[col]) == 2.0
    # K = 3 non-finite batches in a row: a clear error naming the count and what to do
    module, trainer = _guard_run(tmp_path / "b", [good[0], nan, nan, nan, good[1]], max_nonfinite=3, steps=10)
    with pytest.raises(NonFiniteLossError, match="3 training steps in a row had a non-finite loss or gradient"):
        trainer.fit(module, datamodule=_ListData([good[0], nan, nan, nan, good[1]]))
    assert module.nonfinite_total == 3
