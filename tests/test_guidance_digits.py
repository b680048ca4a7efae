"""Guidance-conditioned student on class-conditional digits (issue 8, acceptance "Guidance"): one AYF-LMD
student trained over w ~ U[1, 4] against the guided teacher tracks it at w = 1, 2 and 4.

The measure is the share of samples that the project's digit classifier (``flowmap.features.digit_classifier``)
assigns to the requested class, for 2000 samples per w (200 per class; the binomial standard error is
<= 0.011 and ~0.003 near a share of 0.98). The teacher is sampled with 64 Euler steps of the guided velocity
v_w = v_u + w (v_c - v_u) (Ho & Salimans 2022, Eq. 6); the student with its own 1- and 2-step flow map.

The share is forgiving: the untrained student (initialized from the teacher, guidance embedding zero-init)
already lands near the class mean in one jump and is classified right ~0.99 of the time at every w; what it
cannot do is respond to w. So the test checks both halves of the acceptance: each share within 0.05 of the
teacher's, and the student's shares move with w where the teacher's do (and the untrained one's do not).
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn

from flowmap.data.digits import load_digits_tensors
from flowmap.features import accuracy, digit_classifier
from flowmap.models import init_student_from_teacher
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.denoising import DenoisingLoss
from flowmap.sampling import sample
from flowmap.student import EulerFlowMap, FlowMap
from flowmap.training import fit
from flowmap.types import LossOutput
from flowmap.velocity import NetVelocity

NET = {
    "name": "unet",
    "data_shape": [1, 8, 8],
    "channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "heads": 2,
    "emb_dim": 64,
    "num_classes": 10,
}
TEACHER_STEPS = 2500
STUDENT_STEPS = 1000
STUDENT_OBJECTIVE = {"name": "ayf_lmd", "equal_share": 0.25, "guidance": 1.0, "guidance_max": 4.0}
WS = (1.0, 2.0, 4.0)
N = 2000  # samples per w
TOL = 0.05  # the bound on |student share - teacher share|
FLAT = 0.01  # where the teacher's share moves by less than this between two w, the student's may move by as much


class FlowMatching(nn.Module):
    """Teacher training in ``fit``'s calling convention: flow matching on the linear path (velocity target,
    logit-normal times) with 10% label dropout for classifier-free guidance (Ho & Salimans 2022, Sec. 3.2)."""

    name, needs_teacher, uses_target = "fm", False, False

    def __init__(self) -> None:
        super().__init__()
        self.loss = DenoisingLoss("linear", "velocity", time_sampling="logit_normal", p_uncond=0.1)

    def forward(
        self, *, student: nn.Module, teacher=None, target=None, x0: Tensor, cond: Tensor | None = None, step: int = 0
    ) -> LossOutput:
        return self.loss(student, x0, cond)


def digit_batches(seed: int, batch: int = 64):
    x, y = load_digits_tensors("train")
    g = torch.Generator().manual_seed(seed)

    def get(step: int):
        i = torch.randint(0, len(x), (batch,), generator=g)
        return x[i], y[i]

    return get


def rises_like(student: dict[float, float], teacher: dict[float, float]) -> list[str]:
    """Where the teacher's share rises between neighbouring w (by more than FLAT) the student's must rise too;
    where it is flat the student's may not fall by more than FLAT; overall the student's must rise from w = 1
    to w = 4 when the teacher's does. Returns the violations."""
    bad = []
    for a, b in zip(WS, WS[1:]):
        d_t, d_s = teacher[b] - teacher[a], student[b] - student[a]
        if d_t > FLAT and not d_s > 0:
            bad.append(f"w={a:g}->{b:g}: teacher +{d_t:.3f}, student {d_s:+.3f}")
        if d_t <= FLAT and d_s < -FLAT:
            bad.append(f"w={a:g}->{b:g}: teacher {d_t:+.3f} (flat), student falls {d_s:+.3f}")
    if teacher[WS[-1]] - teacher[WS[0]] > FLAT and not student[WS[-1]] > student[WS[0]]:
        bad.append(f"w={WS[0]:g}->{WS[-1]:g}: the student's share does not rise")
    return bad


@pytest.mark.long
def test_guided_student_tracks_the_guided_teacher_on_digits():
    """The guided student at 2 NFE: its class share is within TOL (the issue's 0.05) of the 64-NFE teacher's at
    w = 1 / 2 / 4 and rises with w as the teacher's does. 1 NFE is printed, not asserted: it misses the 0.05 bound
    at w = 1 (measurements in docs/measurements.md)."""
    torch.set_num_threads(1)
    t_start = time.time()
    torch.manual_seed(0)
    net = build_net(dict(NET))
    fit(net, FlowMatching(), digit_batches(1), TEACHER_STEPS, lr=1e-3, lr_final=1e-5)
    teacher = NetVelocity(net, "linear", "velocity").eval().requires_grad_(False)
    t_teacher = time.time() - t_start
    classifier = digit_classifier(steps=1000, seed=0)

    c = torch.arange(N) % 10
    z = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def share(x: Tensor) -> float:
        return accuracy(classifier, x, c)

    with torch.no_grad():
        ref = {w: share(sample(EulerFlowMap(teacher, guidance=w), z, 64, c)) for w in WS}

    torch.manual_seed(0)
    student = FlowMap(build_net({**NET, "guidance_input": True}))
    init_student_from_teacher(student, teacher)

    def shares(nfe: int) -> dict[float, float]:
        with torch.no_grad():
            return {w: share(sample(student, z, nfe, c, guidance=w)) for w in WS}

    before = {k: shares(k) for k in (1, 2)}
    t0 = time.time()
    fit(
        student,
        build_objective(dict(STUDENT_OBJECTIVE)),
        digit_batches(1),
        STUDENT_STEPS,
        teacher=teacher,
        lr=3e-4,
        lr_final=1.5e-5,
    )
    t_student = time.time() - t0
    after = {k: shares(k) for k in (1, 2)}

    fmt = lambda d: " / ".join(f"{d[w]:.3f}" for w in WS)  # noqa: E731
    print(
        f"\nclass share at w = {' / '.join(f'{w:g}' for w in WS)}: teacher 64 NFE {fmt(ref)} "
        f"({TEACHER_STEPS} steps, {t_teacher:.0f}s); AYF-LMD student {STUDENT_STEPS} steps ({t_student:.0f}s): "
        f"1 NFE {fmt(before[1])} -> {fmt(after[1])}, 2 NFE {fmt(before[2])} -> {fmt(after[2])}; "
        f"total {time.time() - t_start:.0f}s"
    )

    # the teacher itself responds to w (else the test checks nothing)
    assert ref[4.0] - ref[1.0] > FLAT and not rises_like(ref, ref)
    # the untrained student does not (its guidance embedding starts at zero): the rise must come from training
    assert max(before[2].values()) - min(before[2].values()) < 1e-3 and rises_like(before[2], ref)
    # the claim (2 NFE): within 0.05 of the teacher at every w, and rising with w as the teacher's share does
    for w in WS:
        assert abs(after[2][w] - ref[w]) <= TOL, f"2 NFE, w={w:g}: student {after[2][w]:.3f}, teacher {ref[w]:.3f}"
    assert not rises_like(after[2], ref), f"2 NFE: {rises_like(after[2], ref)}"
    # 1 NFE is reported (printed above), not claimed: see the docstring
