"""The analytic Gaussian-mixture teacher (teachers/gmm.py): velocity, flow map, samples, files, errors.

On an affine path the marginal is p_t(x) = sum_k pi_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I); it is
written out here from the means and covariances, independently of the teacher's code, and the teacher's
velocity must satisfy the continuity equation d p/dt + div(p v) = 0 (finite differences).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowmap.paths import CosinePath, LinearPath, VPPath
from flowmap.predictions import convert
from teachers import GaussianMixtureTeacher, PresetMixture, preset_mixture


def _random_mixture(K: int = 3, D: int = 3, seed: int = 0) -> GaussianMixtureTeacher:
    """K components in D dims with full (non-diagonal, anisotropic) covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64) * 0.4
    covs = A @ A.transpose(1, 2) + 0.05 * torch.eye(D, dtype=torch.float64)
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixtureTeacher(means, covs, weights)


def _log_density(mix: GaussianMixtureTeacher, x: torch.Tensor, t: torch.Tensor, path) -> torch.Tensor:
    """log p_t(x) for x (B, D), t (B,): the mixture pushed along x_t = alpha x0 + sigma eps."""
    a, s = path.alpha(t), path.sigma(t)
    D = x.shape[1]
    eye = torch.eye(D, dtype=torch.float64)
    terms = []
    for k in range(mix.means.shape[0]):
        C = a[:, None, None] ** 2 * mix.covs[k] + s[:, None, None] ** 2 * eye  # (B, D, D)
        r = x - a[:, None] * mix.means[k]
        maha = (r[:, None, :] @ torch.linalg.solve(C, r[:, :, None]))[:, 0, 0]
        logn = -0.5 * (maha + torch.logdet(C) + D * math.log(2 * math.pi))
        terms.append(torch.log(mix.weights[k]) + logn)
    return torch.logsumexp(torch.stack(terms, 1), 1)


def _continuity_residual(mix, path, x, t, velocity, h: float = 2e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(d p/dt + div(p v), |d p/dt| + sum_i |d(p v_i)/dx_i|) by central differences, both (B,)."""
    p = lambda y, tau: _log_density(mix, y, tau, path).exp()  # noqa: E731
    dp_dt = (p(x, t + h) - p(x, t - h)) / (2 * h)
    div, scale = torch.zeros_like(t), dp_dt.abs()
    for i in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, i] = h
        flux_plus = p(x + e, t) * velocity(x + e, t)[:, i]
        flux_minus = p(x - e, t) * velocity(x - e, t)[:, i]
        d_i = (flux_plus - flux_minus) / (2 * h)
        div, scale = div + d_i, scale + d_i.abs()
    return dp_dt + div, scale


def _points(mix, path, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ p_t at times t in [0.1, 0.9] (where the density is not negligible), float64."""
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = mix.sample(n, generator=g).double()
    eps = torch.randn(n, mix.data_shape[0], generator=g, dtype=torch.float64)
    return path.sample(x0, eps, t), t


@pytest.mark.parametrize("mixture", ["ring8", "random3d", "aniso2d", "scales16"])
@pytest.mark.parametrize("path", [LinearPath(), VPPath(), CosinePath()], ids=lambda p: p.name)
def test_velocity_satisfies_continuity_equation(mixture, path):
    mix = _random_mixture() if mixture == "random3d" else preset_mixture(mixture)
    x, t = _points(mix, path, 48)
    v = lambda y, tau: mix.exact_velocity(y, tau, path)  # noqa: E731
    res, scale = _continuity_residual(mix, path, x, t, v)
    rel = (res.abs() / scale).max().item()
    assert rel < 1e-6, f"continuity residual {rel:.3g} of the flux scale"
    # a slightly wrong field (5 % too fast) violates it by far more: the check has teeth
    res_bad, scale_bad = _continuity_residual(mix, path, x, t, lambda y, tau: 1.05 * v(y, tau))
    assert (res_bad.abs() / scale_bad).max().item() > 1e-2


def test_velocity_matches_score_of_marginal():
    """On the linear path the velocity converted to a score equals grad log p_t (autograd of the density)."""
    mix = preset_mixture("ring8")
    x, t = _points(mix, LinearPath(), 64)
    x = x.requires_grad_(True)
    score = torch.autograd.grad(_log_density(mix, x, t, LinearPath()).sum(), x)[0]
    x = x.detach()
    got = convert(mix.velocity(x, t), "velocity", "score", x, t, LinearPath())
    assert (got - score).abs().max().item() < 1e-9 * (1 + score.abs().max().item())


def _single_gaussian():
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    S = torch.tensor([0.05, 1.0, 4.0], dtype=torch.float64)  # diagonal, anisotropic
    return GaussianMixtureTeacher(mu, torch.diag(S)[None]), mu[0], S


def test_single_gaussian_flow_map_closed_form():
    """x_t = (1 - t) mu + A_t A_s^{-1} (x_s - (1 - s) mu), A_t = ((1 - t)^2 S + t^2 I)^{1/2} (commuting S).

    One batch holds several (s, t) pairs, noise to data, partial jumps and data to noise (per-sample times)."""
    teacher, mu, S = _single_gaussian()
    A = lambda tau: torch.sqrt((1 - tau)[:, None] ** 2 * S + tau[:, None] ** 2)  # noqa: E731
    pairs = [(1.0, 0.0), (0.7, 0.2), (0.1, 0.9), (0.0, 1.0), (0.5, 0.45)]
    per = 16
    s = torch.tensor([p[0] for p in pairs for _ in range(per)], dtype=torch.float64)
    t = torch.tensor([p[1] for p in pairs for _ in range(per)], dtype=torch.float64)
    x_s = (1 - s)[:, None] * mu + A(s) * torch.randn(len(s), 3, dtype=torch.float64)  # x_s ~ p_s
    want = (1 - t)[:, None] * mu + A(t) / A(s) * (x_s - (1 - s)[:, None] * mu)
    got = teacher.flow_map(x_s, s, t, steps=200)
    assert got.dtype == torch.float64
    err = (got - want).abs().amax(1).reshape(len(pairs), per).amax(1)
    for (s0, t0), e in zip(pairs, err.tolist()):
        assert e < 1e-8, f"flow map X(x, {s0}, {t0}) off by {e:.3g}"
    # the field is not trivial: one Euler step over the same jumps misses by far more
    euler = x_s + (t - s)[:, None] * teacher.velocity(x_s, s)
    assert (euler - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ["aniso2d", "scales16"])
def test_benchmark_presets_flow_map_is_the_velocity_flow(name):
    """The presets of the mixture benchmark: their exact flow map composes (X(X(x, 1, 0.4), 0.4, 0) = X(x, 1, 0)),
    its time derivative at t = s is the velocity, and it carries noise to the data's moments."""
    mix = preset_mixture(name)
    D = mix.data_shape[0]
    assert D == (2 if name == "aniso2d" else 16)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(64, D, generator=g, dtype=torch.float64)
    one = torch.ones(64, dtype=torch.float64)
    full = mix.flow_map(z, one, 0 * one, steps=100)
    mid = mix.flow_map(z, one, 0.4 * one, steps=60)
    two = mix.flow_map(mid, 0.4 * one, 0 * one, steps=60)
    assert (two - full).abs().max().item() < 1e-4  # RK4 error of the sharpest component (std 0.02)
    s, h = 0.6 * one, 1e-4
    x_s = mix.flow_map(z, one, s, steps=40)
    fd = (mix.flow_map(x_s, s, s - h, steps=4) - mix.flow_map(x_s, s, s + h, steps=4)) / (2 * h)
    v = mix.velocity(x_s, s)
    assert (fd + v).abs().max().item() < 1e-6 * (1 + v.abs().max().item())  # d/dt X(x, s, t) at t = s is v
    # the map's samples have the data's per-coordinate variance (the presets are about unit scale)
    n = 1000
    x0 = mix.flow_map(torch.randn(n, D, generator=g, dtype=torch.float64), torch.ones(n), torch.zeros(n), steps=12)
    data = mix.sample(50_000, generator=g).double()
    assert 0.3 < data.var(0).mean().sqrt().item() < 1.5
    assert (x0.var(0).mean() / data.var(0).mean() - 1).abs().item() < 0.1


def test_sample_mean_and_covariance():
    mix = _random_mixture(K=3, D=3, seed=4)
    n = 200_000
    x = mix.sample(n, generator=torch.Generator().manual_seed(5))
    assert x.shape == (n, 3) and x.dtype == torch.float32
    x = x.double()
    w, mu, S = mix.weights, mix.means, mix.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (S + mu[:, :, None] * mu[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    sd = torch.sqrt(torch.diagonal(cov))
    # 6 standard errors of the sample mean / covariance
    assert torch.all((x.mean(0) - mean).abs() < 6 * sd / math.sqrt(n))
    emp_cov = torch.cov(x.T)
    tol = 6 * math.sqrt(2.0) * (sd[:, None] * sd[None, :]) * 3 / math.sqrt(n)  # heavy-tailed mixture: 3x slack
    assert torch.all((emp_cov - cov).abs() < tol), (emp_cov - cov).abs().max()


def test_labelled_sampling_and_conditional_velocity():
    mix = preset_mixture("ring8")  # labels = component index mod 2
    cond = torch.tensor([0, 1] * 500)
    x, y = mix.sample_labeled(1000, generator=torch.Generator().manual_seed(2), cond=cond)
    assert torch.equal(y, cond)
    # class c's velocity is the velocity of the mixture of class c's components alone
    sub = GaussianMixtureTeacher(mix.means[1::2], mix.covs[1::2], mix.weights[1::2])
    xt = torch.randn(32, 2, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64)
    ones = torch.ones(32, dtype=torch.long)
    assert torch.allclose(mix.velocity(xt, t, ones), sub.velocity(xt, t), atol=1e-12, rtol=0)
    # guidance w: v_u + w (v_c - v_u)
    v_u, v_c = mix.velocity(xt, t), mix.velocity(xt, t, ones)
    assert torch.allclose(mix.velocity(xt, t, ones, guidance=3.0), v_u + 3.0 * (v_c - v_u), atol=1e-12, rtol=0)
    # the null label means "whole mixture"
    null = torch.full((32,), mix.num_classes, dtype=torch.long)
    assert torch.allclose(mix.velocity(xt, t, null), v_u, atol=1e-12, rtol=0)


def test_gmm_data_set_comes_from_the_entry_point():
    """``get_dataset("gmm")`` is the mixture's own labelled samples, declared by the teachers package in the
    flowmap.datasets entry-point group (pyproject.toml): the data registry names no teachers module."""
    from importlib.metadata import entry_points

    from flowmap.data import get_dataset

    assert {ep.name: ep.value for ep in entry_points(group="flowmap.datasets")}["gmm"] == "teachers.gmm:gmm_source"
    src = get_dataset("gmm", preset="ring8", n_train=300, n_val=0, seed=3)
    x, y = src.tensors("train")
    want_x, want_y = PresetMixture("ring8").sample_labeled(300, src.split_generator("train"))
    assert src.num_classes == 2 and set(y.tolist()) == {0, 1}
    assert torch.equal(x, want_x.float()) and torch.equal(y, want_y)
    assert get_dataset("gmm", preset="ring8", labels=False).num_classes == 0


@pytest.mark.parametrize("name", ["ring8", "grid4"])
def test_save_from_file_round_trip(tmp_path, name):
    mix = preset_mixture(name)
    path = mix.save(tmp_path / f"{name}.json")
    spec = json.loads(path.read_text())
    assert set(spec) >= {"means", "covs", "weights"}
    back = GaussianMixtureTeacher.from_file(path)
    for key in ("means", "covs", "weights"):
        assert torch.equal(getattr(back, key), getattr(mix, key)), key
    assert back.num_classes == mix.num_classes
    assert (back.labels is None) == (mix.labels is None)
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64)
    assert torch.equal(back.velocity(x, t), mix.velocity(x, t))
    # the YAML-friendly wrapper loads the same file
    assert torch.equal(PresetMixture(path=str(path)).means, mix.means)


def test_from_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        GaussianMixtureTeacher.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        GaussianMixtureTeacher.from_file(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"means": [[0.0, 0.0]]}))
    with pytest.raises(ValueError, match="covs"):
        GaussianMixtureTeacher.from_file(partial)


def test_bad_input_raises():
    means = torch.zeros(2, 2)
    eye = torch.eye(2).expand(2, 2, 2)
    not_pd = torch.tensor([[[1.0, 0.0], [0.0, -0.1]], [[1.0, 0.0], [0.0, 1.0]]])
    not_sym = torch.tensor([[[1.0, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixtureTeacher(means, not_pd)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixtureTeacher(means, not_sym)
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixtureTeacher(means, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixtureTeacher(torch.zeros(2), eye)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureTeacher(means, eye, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="unknown mixture preset"):
        preset_mixture("spiral")

    mix = preset_mixture("grid4")  # unlabelled
    x, t = torch.randn(4, 2), torch.rand(4)
    with pytest.raises(ValueError, match="x has shape"):
        mix.velocity(torch.randn(4, 3), t)
    with pytest.raises(ValueError, match="x has shape"):
        mix.velocity(torch.randn(4, 2, 1), t)
    with pytest.raises(ValueError, match="unconditional"):
        mix.velocity(x, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        mix.sample(4, cond=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix.velocity(x, torch.tensor([0.5, 0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix.velocity(x, torch.tensor([0.5, -0.01, 0.5, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        mix.velocity(x, torch.rand(3))
    labelled = preset_mixture("ring8")  # 2 classes, null label 2
    with pytest.raises(ValueError, match="class labels must lie"):
        labelled.velocity(x, t, torch.full((4,), 3, dtype=torch.long))
