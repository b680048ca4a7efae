"""Evaluation EMA set by a half-life (flowmap.ema.EMASchedule): the weight of the run's last steps is what
the half-life says for short and long runs alike, and a short Lightning run exports trained weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowmap.ema import EMASchedule, ema_update, halflife_decay


def _weights(schedule: EMASchedule, steps: int) -> torch.Tensor:
    """The EMA's weight on each step's parameters (T,), and on the initialization, after ``steps`` updates:
    the source at step k is the k-th unit vector, so the average's coordinates are the weights."""
    target, source = nn.Linear(steps + 1, 1, bias=False).double(), nn.Linear(steps + 1, 1, bias=False).double()
    with torch.no_grad():
        target.weight.zero_()
        target.weight[0, steps] = 1.0  # the initialization's own coordinate
        for k in range(steps):
            source.weight.zero_()
            source.weight[0, k] = 1.0
            ema_update(target, source, schedule(k))
    return target.weight[0].detach()


@pytest.mark.parametrize("steps", [50, 2000])
def test_fraction_halflife_gives_every_run_length_the_same_weight_on_its_last_tenth(steps):
    w = _weights(EMASchedule(halflife=0.1, total_steps=steps), steps)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    last = float(w[steps - steps // 10 : steps].sum())
    assert last == pytest.approx(0.5, abs=1e-9)  # half-life = the last 10%: 1 - 0.5 ** 1
    assert float(w[steps]) == pytest.approx(0.5**10, rel=1e-9)  # the init: ten half-lives ago
    # the old constant 0.999 keeps (0.999 ** 50 =) 95% of a 50-step run's initialization
    old = _weights(EMASchedule(decay=0.999), steps)
    assert float(old[steps]) == pytest.approx(0.999**steps, rel=1e-9)


def test_halflife_in_steps_and_growing_fraction():
    w = _weights(EMASchedule(halflife=20.0), 400)
    assert float(w[360:400].sum()) == pytest.approx(1 - 0.5**2, abs=1e-9)  # 40 steps = two half-lives
    assert halflife_decay(20.0) ** 20 == pytest.approx(0.5, rel=1e-12)
    # run length unknown: h = 0.1 (k + 1) grows with the run; the init weight is 2 ** -(H_T / 0.1)
    T = 200
    w = _weights(EMASchedule(halflife=0.1), T)
    harmonic = sum(1.0 / (k + 1) for k in range(T))
    assert float(w[T]) == pytest.approx(2.0 ** (-harmonic / 0.1), rel=1e-6)
    assert float(w[T - 20 : T].sum()) > 0.5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ema_halflife must be positive"):
        EMASchedule(halflife=0.0)
    with pytest.raises(ValueError, match="EMA decay must lie in"):
        EMASchedule(decay=1.5)


def _short_run(**ema) -> tuple[float, float]:
    """(|ema - raw|, |raw - init|) after a 50-step TeacherModule run on a 2-D toy set."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from flowmap.lightning.teacher_module import TeacherModule

    torch.manual_seed(0)
    module = TeacherModule(
        net={"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "emb_dim": 16}, lr=1e-2, **ema
    )
    init = torch.cat([p.detach().flatten().clone() for p in module.net.parameters()])
    data = torch.randn(2048, 2) * 0.5 + 2.0
    loader = DataLoader(TensorDataset(data), batch_size=64, shuffle=True)
    trainer = L.Trainer(
        max_steps=50,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    raw = torch.cat([p.detach().flatten() for p in module.net.parameters()])
    ema = torch.cat([p.detach().flatten() for p in module.ema.parameters()])
    return float((ema - raw).norm()), float((raw - init).norm())


def test_short_run_exports_trained_weights_not_its_init():
    lag, moved = _short_run()  # default: half-life 10% of the run
    assert lag < 0.25 * moved
    lag_old, moved_old = _short_run(ema_decay=0.999)  # the former default stays available
    assert lag_old > 0.9 * moved_old
