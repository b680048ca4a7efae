"""Progressive distillation (Salimans & Ho 2022, Alg. 2) on the flow-map student.

Round r teaches the student N_r = N0 / 2^r steps: one student jump over 1/N_r equals two jumps of the
previous round's model over 1/(2 N_r),

    t = i / N_r,  i ~ U{1, ..., N_r},  t' = t - 1 / (2 N_r),  t'' = t - 1 / N_r
    x_t = (1 - t) x0 + t eps
    x'' = X_prev(X_prev(x_t, t, t'), t', t'')                        (Alg. 2: two DDIM steps of the teacher)
    L = || u_theta(x_t, t, t'') - (x'' - x_t) / (t'' - t) ||^2         (the target as an average velocity)

The last term is ||X_theta(x_t, t, t'') - x''||^2 N_r^2: the paper's x-space target with a weight that keeps
every round on the velocity scale. Round 0's X_prev is the teacher itself (one Euler step,
``EulerFlowMap``, or one Heun step); later rounds use a frozen snapshot of the student taken at the round
boundary, or with ``snapshot_halflife`` > 0 (our addition) of the EMA of its weights, whose half-life is that
share of the round's length: the live weights at a boundary carry the optimizer's step noise, and every later
round copies it into its targets. The schedule (round, N_r) is a pure function of the global step; the snapshot is
a submodule of the objective, so it lives in the checkpoint's state dict, never trains (requires_grad False) and is
restored on resume. Under Lightning the rounds are driven by the ``ProgressiveRounds`` callback
(``flowmap.lightning.callbacks``), which calls ``advance`` before each batch; ``forward`` calls it too, so a plain
torch loop follows the same schedule. After the last round (N = 1) the student is a one-step sampler X(eps, 1, 0).

Retaining the finer grids (``retain_share``, our addition; Salimans & Ho keep only the last round's student).
A flow-map student is also asked for 2, 4, ... steps after the last round, but from round r on it trains only
jumps of 1/N_r and forgets the finer ones. With ``retain_share`` > 0, that share of each batch (rounds r >= 1)
draws a finer grid N_j = N0 / 2^j, j ~ U{0, ..., r - 1}, and regresses the student onto the round snapshot's own
single jump there (which it learned in round j and, retaining, kept since):

    t = i / N_j,  t'' = t - 1 / N_j,   L = || u_theta(x_t, t, t'') - u_prev(x_t, t, t'') ||^2
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowmap.ema import frozen_copy
from flowmap.objectives.base import GUIDANCE, Draw, Objective, mask_nonfinite, sq_norm
from flowmap.objectives.common import check_count, check_solver, check_step, times_like
from flowmap.solvers import teacher_step
from flowmap.types import LossOutput, Teacher, expand_like

SNAPSHOT = "round_teacher"


class ProgressiveDistillation(Objective):
    """Progressive distillation with rounds N0, N0/2, ..., 1 student steps; per-sample loss (B,).

    Args:
        initial_steps: N0, the first round's student step count (a power of two); the round-0 teacher takes 2 N0 steps.
        steps_per_round: training steps of each round after the first.
        first_round_steps: training steps of round 0 (default ``steps_per_round``); a student trained from
            scratch (no teacher weights to start from) needs a longer first round.
        solver: the round-0 teacher step, ``euler`` (the teacher as ``EulerFlowMap``) or ``heun``.
        guidance: teacher CFG scale when labels are given (baked into the student, or fed to a student with
            ``guidance_input``).
        retain_share: share of each batch (rounds >= 1) spent keeping the finer grids' jumps (see above); 0 = the paper.
        snapshot_halflife: half-life of the EMA of the student's weights that a round boundary snapshots, as a share
            of the current round's length (0: the live weights, the paper's).
    """

    name = "pd"
    callbacks = ("flowmap.lightning.callbacks:ProgressiveRounds",)  # calls ``advance`` before each batch

    shared = GUIDANCE

    def __init__(
        self,
        initial_steps: int = 8,
        steps_per_round: int = 500,
        first_round_steps: int | None = None,
        solver: str = "heun",
        retain_share: float = 0.0,
        snapshot_halflife: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= snapshot_halflife <= 1.0:
            raise ValueError(f"snapshot_halflife (a share of a round) must lie in [0, 1], got {snapshot_halflife}")
        self.snapshot_halflife = float(snapshot_halflife)
        self.uses_target = self.snapshot_halflife > 0  # the round teacher is then a snapshot of the EMA target
        if not 0.0 <= retain_share < 1.0:
            raise ValueError(f"retain_share must lie in [0, 1), got {retain_share}")
        self.retain_share = float(retain_share)
        check_count("initial_steps", initial_steps, 1)
        if initial_steps & (initial_steps - 1):
            raise ValueError(
                f"initial_steps (N0) must be a power of two so that rounds halve it down to 1, got {initial_steps}"
            )
        self.initial_steps = initial_steps
        self.steps_per_round = check_count("steps_per_round", steps_per_round, 1)
        self.first_round_steps = (
            steps_per_round if first_round_steps is None else check_count("first_round_steps", first_round_steps, 1)
        )
        check_solver(solver)
        self.solver = solver
        self.register_module(SNAPSHOT, None)  # the frozen round teacher (rounds >= 1), built at the round boundary
        self.register_buffer("snapshot_round", torch.zeros((), dtype=torch.long))  # round whose teacher the snapshot is
        self._pending: dict[str, Tensor] | None = None
        self._snapshot_round: int | None = 0  # host copy of ``snapshot_round`` (None: read it once, after a load)

    # --- the schedule: pure functions of the step ------------------------------------------------------
    @property
    def num_rounds(self) -> int:
        """log2(N0) + 1 rounds: N0, N0/2, ..., 1."""
        return int(math.log2(self.initial_steps)) + 1

    @property
    def total_steps(self) -> int:
        """Training steps until the last round (N = 1) is complete."""
        return self.first_round_steps + (self.num_rounds - 1) * self.steps_per_round

    def rounds(self, step: int) -> int:
        """The round index r at ``step`` (0-based; stays at the last round after ``total_steps``):
        round 0 spans [0, F), round r >= 1 spans [F + (r - 1) S, F + r S) with F = first_round_steps,
        S = steps_per_round."""
        k = check_step(step)
        if k < self.first_round_steps:
            return 0
        return min(1 + (k - self.first_round_steps) // self.steps_per_round, self.num_rounds - 1)

    def current_steps(self, step: int) -> int:
        """N_r: the student's step count being distilled at ``step``."""
        return self.initial_steps >> self.rounds(step)

    def target_decay(self, step: int) -> float:
        """Decay of the weights' EMA that the next boundary snapshots: half-life ``snapshot_halflife`` times the
        length of the round at ``step`` (in steps)."""
        length = self.first_round_steps if self.rounds(step) == 0 else self.steps_per_round
        return 0.5 ** (1.0 / max(1.0, self.snapshot_halflife * length)) if self.uses_target else 0.0

    # --- the round teacher ---------------------------------------------------------------------------
    def advance(self, student: nn.Module, step: int, target: nn.Module | None = None) -> None:
        """Snapshot ``student`` (``target``, its EMA, with ``snapshot_halflife``) as the round teacher when ``step``
        enters a new round (call before the loss; ``forward`` does). A snapshot is a frozen copy; it stays put until
        the next round boundary."""
        r = self.rounds(step)
        if self._pending is not None:
            self._restore(student)
        if self._snapshot_round is None:  # once after loading a checkpoint; no host read in the other steps
            self._snapshot_round = int(self.snapshot_round)
        have = self._snapshot_round
        if r > have or (r > 0 and self.round_teacher is None):
            snap = frozen_copy(target if self.uses_target and target is not None else student)
            for p in snap.parameters():
                p.grad = None
            self.round_teacher = snap
            self.snapshot_round.fill_(r)
            self._snapshot_round = r
        elif 0 < r < have:
            raise ValueError(
                f"step {step} is in round {r}, but the round teacher is already the snapshot of round {have}; "
                "a run cannot go back to an earlier round"
            )

    def _restore(self, student: nn.Module) -> None:
        snap = frozen_copy(student)
        snap.load_state_dict(self._pending)
        for p in snap.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.round_teacher = snap
        self._pending = None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """A checkpoint may hold a snapshot that this fresh objective has not built yet: keep its tensors and
        rebuild the snapshot from the student's architecture at the next ``advance``."""
        key = prefix + SNAPSHOT + "."
        pending = {k[len(key) :]: v for k, v in state_dict.items() if k.startswith(key)}
        if self.round_teacher is None and pending:
            self._pending = pending
        elif self.round_teacher is not None and not pending:
            self.round_teacher = None  # the checkpoint predates the first snapshot
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._snapshot_round = None
        if self._pending is not None:
            unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(key)]

    def previous_jump(self, teacher: Teacher, x: Tensor, s: Tensor, t: Tensor, d: Draw, r: int) -> Tensor:
        """One jump s -> t of the previous round's model (the teacher in round 0), under no_grad."""
        with torch.no_grad():
            if r == 0:
                return teacher_step(teacher, x, s, t, self.solver, d.cond, d.w_teacher)
            return d.X(self.round_teacher, x, s, t)

    # --- the loss ----------------------------------------------------------------------------------------
    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """t = i / N, t'' = (i - 1) / N, i ~ U{1, ..., N} on the round's grid N (a retained row: a finer grid);
        extra ``t_mid`` = t' (retained rows: t'', the snapshot's single jump) and ``retain``."""
        r = self.rounds(step)
        N = self.initial_steps >> r
        grid = torch.full((batch,), N, device=x0.device)  # each row's step count
        retain = torch.zeros(batch, dtype=torch.bool, device=x0.device)
        if r > 0 and self.retain_share > 0:  # finer grids N0 / 2^j, j < r, learned in earlier rounds
            retain = torch.rand(batch, device=x0.device) < self.retain_share
            finer = self.initial_steps >> torch.randint(0, r, (batch,), device=x0.device)
            grid = torch.where(retain, finer, grid)
            i = (torch.rand(batch, device=x0.device) * grid).long().clamp_(max=grid - 1) + 1  # i ~ U{1, ..., grid}
        else:
            i = torch.randint(1, N + 1, (batch,), device=x0.device)
        t, t_end = times_like(i / grid, x0), times_like((i - 1.0) / grid, x0)
        # retained rows: the snapshot's single jump t -> t'' (its second jump t'' -> t'' is the identity X(x, s, s) = x)
        t_mid = torch.where(retain, t_end, times_like((i - 0.5) / grid, x0))
        return t, t_end, {"t_mid": t_mid, "retain": retain}

    def loss(self, d: Draw, student: nn.Module, teacher, target, step: int) -> LossOutput:
        self.advance(student, step, target)
        r = self.rounds(step)
        t, t_mid, t_end = d.s, d.extra["t_mid"], d.t
        x_mid = self.previous_jump(teacher, d.x_s, t, t_mid, d, r)
        x_end = self.previous_jump(teacher, x_mid, t_mid, t_end, d, r)
        u_target, finite, n_bad = mask_nonfinite((x_end - d.x_s) / expand_like(t_end - t, d.x_s))  # two jumps' u
        u = d.u(student, d.x_s, t, t_end)
        loss = sq_norm(u - u_target) / d.x0[0].numel() * finite
        return LossOutput(
            loss=loss,
            logs={
                "mse": loss.detach(),
                "round": torch.tensor(float(r)),
                "retained": d.extra["retain"].float(),
                "student_steps": torch.tensor(float(self.initial_steps >> r)),
                "t": t.detach().float(),
                "nonfinite_targets": n_bad.float(),
            },
        )
