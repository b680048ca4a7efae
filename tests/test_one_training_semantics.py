"""One training semantics: ``flowmap.training.TrainLoop`` (the benchmark's trainer) and a Lightning ``DistillModule``
under a ``Trainer`` share the schedule (``flowmap.schedule``), the optimizer, clipping, the non-finite guard, the EMA
target and the evaluation EMA.

* test_schedule_warmup_then_cosine_to_the_final_rate: the rates of the shared schedule at the warm-up, the peak
  and the last step (lr_final exactly), and the same floats from the torch scheduler the Lightning modules use.
* test_lightning_and_train_loop_give_the_same_weights: 20 steps from one seed on one fixed list of batches, for cd
  (an EMA target and a teacher) and meanflow (a JVP): equal student, EMA target and evaluation EMA weights.
* test_train_loop_guard_skips_non_finite_steps_and_stops_after_k: a NaN batch leaves the weights unchanged and is
  counted; K in a row stop the run with ``NonFiniteLossError``.
"""

from __future__ import annotations

import copy
import itertools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flowmap.ema import EMASchedule
from flowmap.lightning.distill_module import DistillModule
from flowmap.lightning.training_mixin import NonFiniteLossError
from flowmap.objectives import build_objective
from flowmap.schedule import LearningRate, learning_rate
from flowmap.training import TrainLoop

STEPS, SEED = 20, 11
NET = {"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "emb_dim": 16}
OPTIONS = {
    "lr": 3e-3,
    "betas": (0.9, 0.99),
    "weight_decay": 1e-2,
    "warmup_steps": 4,
    "lr_final_ratio": 0.05,
    "max_nonfinite": 5,
}


def test_schedule_warmup_then_cosine_to_the_final_rate() -> None:
    lr, final, total, warm = 1.0, 0.05, 20, 4
    rates = [learning_rate(k, lr, total, warm, final) for k in range(total)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and rates[-1] == final
    mid = warm + (total - warm - 1) / 2  # halfway through the decay: the mean of lr and lr_final
    assert (
        learning_rate(math.floor(mid), lr, total, warm, final)
        > (lr + final) / 2
        > learning_rate(math.ceil(mid), lr, total, warm, final)
    )
    assert all(a >= b for a, b in itertools.pairwise(rates[3:]))
    assert [learning_rate(k, lr, None, 0, None) for k in (0, 100)] == [lr, lr]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, seen = LearningRate(opt, lr, total, warm, final), []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == rates  # the same floats, bit for bit
    with pytest.raises(ValueError, match="needs the number of steps"):
        LearningRate(opt, lr, None, 0, final)


class _Seed(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        torch.manual_seed(SEED)


def _batches() -> list[torch.Tensor]:
    from teachers import preset_mixture

    return [x for x in preset_mixture("ring8").sample(64 * STEPS, generator=torch.Generator().manual_seed(3)).split(64)]


@pytest.mark.parametrize("method", ["cd", "meanflow"])
@pytest.mark.timeout(120)
def test_lightning_and_train_loop_give_the_same_weights(method: str) -> None:
    from teachers import preset_mixture

    teacher = preset_mixture("ring8")
    torch.manual_seed(0)
    module = DistillModule(
        {"name": method}, {"net": NET}, teacher=teacher, lr_decay="cosine", ema_halflife=0.25, **OPTIONS
    )
    student = copy.deepcopy(module.student)
    batches = _batches()
    before = [p.detach().clone() for p in student.parameters()]

    loader = DataLoader(batches, batch_size=None, generator=torch.Generator())  # draws nothing from the global RNG
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[_Seed()],
    )
    trainer.fit(module, train_dataloaders=loader)

    loop = TrainLoop(
        student,
        build_objective({"name": method}),
        teacher,
        steps=STEPS,
        grad_clip=1.0,
        decoupled=True,
        ema=EMASchedule(halflife=0.25, total_steps=STEPS),
        **OPTIONS,
    )
    torch.manual_seed(SEED)
    for x0 in batches:
        loop.step(x0)

    assert trainer.global_step == loop.k == STEPS and loop.nonfinite_total == module.nonfinite_total == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))  # it trained
    pairs = [(module.student, student), (module.ema, loop.ema)]
    if method == "cd":
        pairs.append((module.target, loop.target))
    for ours, theirs in pairs:
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a, b), float((a - b).abs().max())


def test_train_loop_guard_skips_non_finite_steps_and_stops_after_k() -> None:
    from flowmap.models import build_student

    torch.manual_seed(0)
    student = build_student({"net": NET})
    loop = TrainLoop(student, build_objective({"name": "ect"}), lr=1e-3, max_nonfinite=3)
    good, nan = _batches()[0], torch.full((64, 2), float("nan"))
    loop.step(good)
    kept = [p.detach().clone() for p in student.parameters()]
    loop.step(nan)
    assert loop.nonfinite_total == 1 and all(torch.equal(a, p) for a, p in zip(kept, student.parameters()))
    loop.step(good)
    assert any(not torch.equal(a, p) for a, p in zip(kept, student.parameters()))
    with pytest.raises(NonFiniteLossError, match="3 training steps in a row had a non-finite loss or gradient"):
        for _ in range(6):
            loop.step(nan)
    assert loop.nonfinite_total == 4
