"""Discrete-time consistency models on the flow-map student: CD, improved CT and Easy Consistency Tuning.

The consistency function of the papers is the student's jump to the data end of the path,

    f_theta(x, t) = X_theta(x, s=t, t=0) = x - t u_theta(x, t, 0)          (f(x, 0) = x by construction)

so the boundary condition f(x, eps) = x (Song et al. 2023, Eq. 3-5) holds exactly at t = 0 and no
c_skip / c_out is needed (``ConsistencyBoundary`` is still available as a parametrization).

Change of variables. The papers use the variance-exploding path x = x0 + sigma z with noise level
sigma; on our linear path x_t = (1 - t) x0 + t eps the same point is x_lin = x_ve / (1 + sigma) at

    t = sigma / (1 + sigma),        sigma = t / (1 - t)

and the consistency function is unchanged (it returns data). Times are drawn in sigma, as in the
papers, and mapped; weights stay in sigma units. The largest discrete noise level sigma_max is moved to
t = 1 (pure noise on the linear path), as ``time_grids.edm_grid`` does, so a student learns X(eps, 1, 0).

Every loss is   lambda * d(f_theta(x_t, t), sg f_theta-(x_r, r)),   r < t,
with d the squared L2 norm or pseudo-Huber d(a, b) = sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal
2023, Sec. 3.3), and the three methods differ in how (x_t, t, x_r, r) are drawn:

    CD    x_r = one Euler / Heun teacher step from x_t      grid neighbours           (Song et al. 2023, Alg. 2)
    iCT   x_r = (1 - r) x0 + r eps  (shared eps)             lognormal over a grid      (Song & Dhariwal 2023)
          whose size N(k) doubles on a curriculum
    ECT   as iCT (or a teacher step)                         t ~ lognormal, r = t - dt(t, step), dt shrinking
                                                                                        (Geng et al. 2024)

From data, ``data_velocity='stf'`` replaces the shared-noise x_r = x_t + (r - t)(eps - x0) by one Euler step of
the batch-posterior estimate of the marginal velocity E[eps - x0 | x_t] (Xu et al. 2023, Stable Target Field;
``common.stable_target``): still data samples only, but the pair then lies near one ODE trajectory
(``training_pair``), which on the 2-D mixtures is what brings ECT from data to the distilled methods' error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowmap.objectives.base import GUIDANCE, Draw, Objective, mask_nonfinite
from flowmap.objectives.common import (
    check_count,
    check_data_velocity,
    check_solver,
    check_step,
    stable_target,
    times_like,
)
from flowmap.paths import LinearPath
from flowmap.solvers import teacher_step  # one ODE stepper (also imported from here by older code)
from flowmap.time_grids import GRIDS, make_grid
from flowmap.time_sampling import lognormal
from flowmap.types import LossOutput, expand_like, null_label

METRICS = ("l2", "pseudo_huber")
LINEAR = LinearPath()  # the EDM noise level sigma = t / (1 - t) and back
HUBER_C_PER_SQRT_DIM = 0.00054  # Song & Dhariwal 2023, Sec. 3.3: c = 0.00054 sqrt(d)


# --- small shared pieces ----------------------------------------------------------------------------


def sigma_to_t(sigma: Tensor) -> Tensor:
    """Noise level of the VE path -> time of the linear path: t = sigma / (1 + sigma) (inf -> 1)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), LINEAR.t_from_ratio(sigma))


def t_to_sigma(t: Tensor) -> Tensor:
    """sigma = t / (1 - t) (t = 1 -> inf)."""
    return LINEAR.ratio(t)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Increasing (n,) float64 noise levels (Karras et al. 2022, Eq. 5; Song et al. 2023, Sec. 5):
    sigma_i = (sigma_min^(1/rho) + (i-1)/(n-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..n."""
    if n < 2:
        raise ValueError(f"a discretization needs at least 2 noise levels, got {n}")
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def consistency_fn(model: nn.Module, x: Tensor, t: Tensor, d: Draw) -> Tensor:
    """f(x, t) = X(x, s=t, t=0 | cond, w) of the draw ``d``: (B, *data_shape)."""
    return d.X(model, x, t, torch.zeros_like(t))


def check_metric(metric: str, huber_c: float | None) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown consistency metric {metric!r}; choose from {list(METRICS)}")
    if huber_c is not None and huber_c <= 0:
        raise ValueError(f"the pseudo-Huber constant must be > 0, got huber_c={huber_c}")


def distance(a: Tensor, b: Tensor, metric: str, huber_c: float | None) -> Tensor:
    """Per-sample d(a, b) (B,), computed in float32 or wider.

    l2:            d = ||a - b||^2                            (Song et al. 2023, Sec. 3)
    pseudo_huber:  d = sqrt(||a - b||^2 + c^2) - c,  c = 0.00054 sqrt(dim) unless given
                                                              (Song & Dhariwal 2023, Sec. 3.3)"""
    delta = (a - b).flatten(1)
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    sq = delta.pow(2).sum(1)
    if metric == "l2":
        return sq
    c = huber_c if huber_c is not None else HUBER_C_PER_SQRT_DIM * math.sqrt(delta.shape[1])
    return torch.sqrt(sq + c * c) - c


def training_pair(data_velocity: str, d: Draw, null: int) -> Tensor:
    """x_r of consistency training from data for the draw's x_t = x_s at t = s > r = d.t:

    conditional:   x_r = (1 - r) x0 + r eps = x_t + (r - t)(eps - x0)                     (Song et al. 2023)
    stf:           x_r = x_t + (r - t) v_hat(x_t, t),  v_hat = the batch-posterior estimate of E[eps - x0 | x_t]
                   (Xu et al. 2023, Stable Target Field; ``stable_target``): one Euler step of the empirical
                   marginal velocity instead of the conditional one, far lower variance, data samples only."""
    if data_velocity == "stf":
        v = stable_target(d.x_s, d.s, d.x0, d.eps, d.cond, null)
        return d.x_s + expand_like(d.t - d.s, d.x0) * v
    return d.at(d.t)


class _Consistency(Objective):
    """Shared loss of the three methods: lambda * d(f_theta(x_t, t), sg f_theta-(x_r, r)) with the target
    network theta- = EMA of theta (decay ``target_ema``; 0 = stop-gradient student, Song & Dhariwal 2023, Sec. 3.2).
    The papers' (t, r) are the draw's (s, t); a method's ``times`` may add its weight lambda as ``extra["weight"]``."""

    uses_target = True
    sampler_gamma = 1.0  # f(x, t) = X(x, t, 0) only: multistep consistency sampling (Song et al. 2023, Alg. 1)
    solver = "heun"

    def __init__(self, metric: str = "pseudo_huber", huber_c: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        check_metric(metric, huber_c)
        self.metric, self.huber_c = metric, huber_c

    def neighbour(self, d: Draw, teacher, student: nn.Module) -> Tensor:
        """x_r: one teacher step x_t -> r (``source="teacher"``) or the training pair from data (``training_pair``)."""
        if self.source == "teacher":
            return teacher_step(teacher, d.x_s, d.s, d.t, self.solver, d.cond, d.w_teacher)
        data_velocity = getattr(self, "data_velocity", "conditional")
        return training_pair(data_velocity, d, null_label(int(getattr(student, "num_classes", 0))))

    def step_logs(self, step: int) -> dict[str, Tensor]:
        """Scalars of the curriculum at ``step``."""
        return {}

    def loss(self, d: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        x_r = self.neighbour(d, teacher, student)
        with torch.no_grad():
            f_target = consistency_fn(target, x_r, d.t, d)  # sg f_theta-(x_r, r)
        f_target, finite, n_bad = mask_nonfinite(f_target)
        f = consistency_fn(student, d.x_s, d.s, d)  # f_theta(x_t, t)
        weight = d.extra.get("weight", torch.ones_like(d.s))  # lambda
        dist = distance(f, f_target, self.metric, self.huber_c)
        gap = (f.detach() - f_target).flatten(1)
        logs = {
            "mse": gap.pow(2).sum(1) / f[0].numel() * finite,
            "weight": weight.detach().float(),
            "t": d.s.detach().float(),
            "dt": (d.s - d.t).detach().float(),
            "nonfinite_targets": n_bad.float(),
        }
        return LossOutput(loss=weight.to(dist.dtype) * dist * finite, logs={**logs, **self.step_logs(step)})


def _weights_in_sigma(kind: str, sigma_t: Tensor, sigma_r: Tensor, sigma_data: float) -> Tensor:
    """lambda in the papers' units: ``inverse_dsigma`` 1 / (sigma_t - sigma_r) (Song & Dhariwal 2023, Sec. 3.1;
    Geng et al. 2024), ``snr`` 1 / sigma_t^2 + 1 / sigma_data^2 (SNR + k of Geng et al.'s released ECT loss),
    ``uniform`` 1 (Song et al. 2023)."""
    if kind == "uniform":
        return torch.ones_like(sigma_t)
    if kind == "inverse_dsigma":
        gap = sigma_t - sigma_r
        return torch.where(
            gap > 0, 1.0 / gap.clamp_min(torch.finfo(gap.dtype).tiny), torch.zeros_like(gap)
        )  # no gap, no signal
    if kind == "snr":
        return 1.0 / sigma_t**2 + 1.0 / sigma_data**2
    raise ValueError(f"unknown consistency weighting {kind!r}; choose from ['inverse_dsigma', 'snr', 'uniform']")


# --- consistency distillation --------------------------------------------------------------------------


class ConsistencyDistillation(_Consistency):
    """CD (Song et al. 2023, Alg. 2) on a decreasing time grid 1 = t_0 > ... > t_N = 0:

        n ~ U{0, ..., N-1},  x_{t_n} = (1 - t_n) x0 + t_n eps
        x_hat = Phi_teacher(x_{t_n}; t_n -> t_{n+1})              (one Euler or Heun step, Eq. 6)
        L = d(f_theta(x_{t_n}, t_n), sg f_theta-(x_hat, t_{n+1}))    (Eq. 7; lambda = 1)

    The defaults (a short uniform grid, l2, target EMA 0.9) are the configs' on every set, images included; the
    paper's image setting is steps=18, grid="edm", target_ema=0.95 (LPIPS or l2 metric).

    Args:
        steps: N, intervals of the grid (paper: 18); grid: ``uniform``, ``edm`` (rho-spaced noise levels, the
            paper's) or ``logsnr`` (``time_grids``); rho: the EDM grid's exponent.
        solver: the teacher's step, ``heun`` (paper) or ``euler``.
        metric: ``l2`` (squared L2) or ``pseudo_huber``; huber_c: its c (default 0.00054 sqrt(dim)).
        target_ema: EMA decay mu of the target network (paper: 0.95 on ImageNet/LSUN; 0 is allowed).
        guidance: classifier-free guidance scale of the teacher when labels are given (baked into the student,
            or fed to it when it was built with ``guidance_input``).
    """

    name = "cd"

    shared = ("target_ema", *GUIDANCE)
    defaults = {"target_ema": 0.9}

    def __init__(
        self,
        steps: int = 8,
        grid: str = "uniform",
        rho: float = 7.0,
        solver: str = "heun",
        metric: str = "l2",
        **kwargs,
    ) -> None:
        super().__init__(metric=metric, **kwargs)
        self.steps = check_count("steps", steps, 1)
        if grid not in GRIDS:
            raise ValueError(f"unknown time grid {grid!r}; choose from {sorted(GRIDS)}")
        check_solver(solver)
        self.grid, self.rho, self.solver = grid, float(rho), solver
        self.register_buffer(
            "grid_times", make_grid(grid, steps, **({"rho": rho} if grid == "edm" else {})).double(), persistent=False
        )

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Grid neighbours (t_n, t_{n+1}), n ~ U{0, ..., N-1}."""
        n = torch.randint(0, self.steps, (batch,), device=x0.device)
        grid = self.grid_times.to(x0.device)
        return times_like(grid[n], x0), times_like(grid[n + 1], x0)


# --- consistency training: lognormal times, weights in sigma ------------------------------------------------


class _ConsistencyTraining(_Consistency):
    """What iCT and ECT share: sigma ~ lognormal(P_mean, P_std), the weighting lambda in sigma units and, from data,
    how x_r is drawn (``training_pair``). Args: p_mean, p_std (paper: -1.1, 2.0); weighting: ``inverse_dsigma``
    (paper), ``snr`` or ``uniform``; sigma_data (``snr``); data_velocity: ``conditional`` or ``stf``."""

    def __init__(
        self,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        weighting: str = "inverse_dsigma",
        sigma_data: float = 0.5,
        data_velocity: str = "conditional",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _weights_in_sigma(weighting, torch.ones(1), torch.zeros(1), sigma_data)
        check_data_velocity(data_velocity, source=self.source)
        self.weighting, self.sigma_data, self.data_velocity = weighting, float(sigma_data), data_velocity
        self.p_mean, self.p_std = float(p_mean), float(p_std)


# --- improved consistency training -----------------------------------------------------------------------


class ImprovedConsistencyTraining(_ConsistencyTraining):
    """iCT (Song & Dhariwal 2023): consistency training from data, no teacher.

        N(k) = min(s0 2^floor(k / K'), s1) + 1,  K' = floor(K / (log2 floor(s1 / s0) + 1))      (Sec. 3.4)
        sigma_1 < ... < sigma_N(k): Karras noise levels (sigma_min, sigma_max, rho)
        p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std))  (Sec. 3.5)
        x_{sigma} = x0 + sigma z  <->  x_t = (1 - t) x0 + t eps, same eps for both levels
        L = 1 / (sigma_{i+1} - sigma_i) d(f_theta(x_{i+1}, t_{i+1}), sg f_theta(x_i, t_i))          (Sec. 3.1-3.3)

    The target is the stop-gradient student (``target_ema`` = 0, Sec. 3.2).

    Args:
        total_steps: K, the training length the curriculum spans; s0, s1: initial and final discretization
            steps (paper: 10, 1280; on the 2-D mixtures 8, 256 did best in short runs with shared-noise pairs,
            8, 64 with ``data_velocity='stf'``); sigma_min, sigma_max, rho: Karras levels; p_mean, p_std: the lognormal
            (paper: -1.1, 2.0); metric, huber_c: as in CD (paper: pseudo-Huber, c = 0.00054 sqrt(dim));
            weighting: ``inverse_dsigma`` (paper), ``snr`` or ``uniform``; data_velocity: ``conditional``
            (the paper's shared-noise pair) or ``stf`` (x_r one Euler step of the batch-posterior velocity,
            ``training_pair``: data only, lower variance).
    """

    name = "ict"
    source = "data"

    shared = ("target_ema",)

    def __init__(
        self,
        total_steps: int = 4000,
        s0: int = 8,
        s1: int = 256,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        p_std = self.p_std
        self.total_steps = check_count("total_steps", total_steps, 1)
        self.s0 = check_count("s0", s0, 1)
        self.s1 = check_count("s1", s1, 1)
        if s1 < s0:
            raise ValueError(f"the curriculum must grow: s1={s1} < s0={s0}")
        if not 0 < sigma_min < sigma_max or rho <= 0 or p_std <= 0:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, rho > 0 and p_std > 0; got {sigma_min}, {sigma_max}, {rho}, {p_std}"
            )
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def discretization_steps(self, step: int) -> int:
        """N(k): the number of noise levels at training step k (a pure function of k)."""
        k = check_step(step)
        k_prime = max(1, math.floor(self.total_steps / (math.log2(math.floor(self.s1 / self.s0)) + 1)))
        return min(self.s0 * 2 ** (k // k_prime), self.s1) + 1

    def sigmas(self, step: int) -> Tensor:
        """The (N(k),) increasing Karras noise levels at step k (float64)."""
        return karras_sigmas(self.discretization_steps(step), self.sigma_min, self.sigma_max, self.rho)

    def interval_probs(self, sigmas: Tensor) -> Tensor:
        """(N - 1,) probabilities of the intervals [sigma_i, sigma_{i+1}] under ln sigma ~ N(P_mean, P_std^2)."""
        cdf = torch.special.erf((torch.log(sigmas) - self.p_mean) / (math.sqrt(2.0) * self.p_std))
        p = cdf[1:] - cdf[:-1]
        return p / p.sum()

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """Neighbouring levels (t_{i+1}, t_i) of the step's discretization, i ~ p(i) (Sec. 3.5); extra ``weight``."""
        sigmas = self.sigmas(step)
        i = torch.multinomial(self.interval_probs(sigmas), batch, replacement=True)
        times = sigma_to_t(sigmas)
        times[-1] = 1.0  # sigma_max -> pure noise on the linear path
        weight = _weights_in_sigma(self.weighting, sigmas[i + 1], sigmas[i], self.sigma_data).to(x0.device)
        return times_like(times[i + 1].to(x0.device), x0), times_like(times[i].to(x0.device), x0), {"weight": weight}

    def step_logs(self, step: int) -> dict[str, Tensor]:
        return {"discretization_steps": torch.tensor(float(self.discretization_steps(step) - 1))}


# --- easy consistency tuning -----------------------------------------------------------------------------


class EasyConsistencyTuning(_ConsistencyTraining):
    """ECT (Geng et al. 2024, "Consistency Models Made Easy"): continuous-time consistency tuning with a
    shrinking gap, best started from a diffusion / flow-matching teacher (``init_from_teacher``).

        sigma_t ~ lognormal(P_mean, P_std)
        sigma_r = max(0, sigma_t (1 - n(sigma_t) / q^(a+1))),  n(sigma) = 1 + k sigmoid(-b sigma),
            a = floor(step / stage_steps)
        x_r = (1 - r) x0 + r eps  (shared eps; ``source='data'``)
            or one teacher step x_t -> r  (``source='teacher'``)
        L = lambda(sigma_t, sigma_r) d(f_theta(x_t, t), sg f_theta(x_r, r)),  lambda = 1 / (sigma_t - sigma_r)

    At the first stages r is often 0, where f(x_r, 0) = x0: the loss is then denoising (diffusion
    pretraining is the dt = t end of consistency training); each stage divides dt by q.

    Args:
        stage_steps: d, training steps per stage; q, k, b: the mapping function (paper: q = 2, k = 8, b = 1);
        p_mean, p_std: lognormal of sigma_t (paper: -1.1, 2.0); metric, huber_c: as in iCT;
        weighting: ``inverse_dsigma`` (paper), ``snr`` (1/sigma^2 + 1/sigma_data^2) or ``uniform``;
        source: ``data`` (shared noise) or ``teacher`` (x_r by one ``solver`` step of the teacher);
        target_ema: 0 = stop-gradient student (paper); guidance: teacher CFG scale (``source='teacher'``);
        data_velocity: with ``source='data'``, ``conditional`` (shared-noise pair, paper) or ``stf`` (x_r one Euler
            step of the batch-posterior velocity, ``training_pair``).
    """

    name = "ect"

    shared = ("source", "target_ema", "guidance")
    defaults = {"source": "data"}

    def __init__(
        self, stage_steps: int = 300, q: float = 2.0, k: float = 8.0, b: float = 1.0, solver: str = "heun", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        p_std = self.p_std
        self.stage_steps = check_count("stage_steps", stage_steps, 1)
        if q <= 1 or k < 0 or b < 0 or p_std <= 0:
            raise ValueError(
                "the mapping function needs q > 1, k >= 0, b >= 0 (and p_std > 0); "
                f"got q={q}, k={k}, b={b}, p_std={p_std}"
            )
        self.solver = check_solver(solver)
        self.q, self.k, self.b = float(q), float(k), float(b)

    def stage(self, step: int) -> int:
        """a = floor(step / stage_steps) (a pure function of the step)."""
        return check_step(step) // self.stage_steps

    def r_of_t(self, sigma_t: Tensor, step: int) -> Tensor:
        """The mapping function: sigma_r = max(0, sigma_t (1 - n(sigma_t) / q^(a+1)))."""
        n = 1 + self.k * torch.sigmoid(-self.b * sigma_t)
        return (sigma_t * (1 - n / self.q ** (self.stage(step) + 1))).clamp_min(0.0)

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """sigma_t ~ lognormal(P_mean, P_std), sigma_r by the mapping function; extra ``weight``."""
        sig_t = lognormal(batch, x0.device, self.p_mean, self.p_std, dtype=torch.float64)
        sig_r = self.r_of_t(sig_t, step)
        weight = _weights_in_sigma(self.weighting, sig_t, sig_r, self.sigma_data)
        return times_like(sigma_to_t(sig_t), x0), times_like(sigma_to_t(sig_r), x0), {"weight": weight}

    def step_logs(self, step: int) -> dict[str, Tensor]:
        return {"stage": torch.tensor(float(self.stage(step)))}
