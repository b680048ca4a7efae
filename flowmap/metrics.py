"""Sample-quality metrics as pure functions of point clouds or feature sets (torch or numpy in, float out).

All computations run in float64 on the CPU (inputs on any device are copied); a sample is a row, so a
batch (N, ...) is flattened to (N, D). Distributions are empirical with uniform weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from flowmap.data.toy2d import CHECKERBOARD, Checkerboard

ArrayLike = Tensor | np.ndarray


def _as_rows(x: ArrayLike, name: str = "x") -> np.ndarray:
    """(N, ...) torch/numpy -> (N, D) float64 numpy."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values")
    return x


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_rows(x, "x"), _as_rows(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same dimension per sample, got {a.shape[1]} and {b.shape[1]}")
    return a, b


def _sq_dists(a: np.ndarray, b: np.ndarray, chunk_elems: int = 2**24) -> np.ndarray:
    """(n, m) squared Euclidean distances |a_i - b_j|^2. Low dimension (D <= 16): from the differences,
    in row chunks (exact zeros for equal points); otherwise |a|^2 + |b|^2 - 2 a.b, clipped at 0."""
    if a.shape[1] > 16:
        d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.maximum(d, 0.0)
    out = np.empty((len(a), len(b)))
    rows = max(1, chunk_elems // max(1, len(b) * a.shape[1]))
    for i in range(0, len(a), rows):
        out[i : i + rows] = ((a[i : i + rows, None, :] - b[None, :, :]) ** 2).sum(-1)
    return out


# --- optimal transport ---------------------------------------------------------------------------


def w2_exact(x: ArrayLike, y: ArrayLike, num_itermax: int = 100_000_000) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of x (n, ...) and y (m, ...):

        W2 = sqrt( min_{P in U(1/n, 1/m)} sum_ij P_ij |x_i - y_j|^2 )

    solved by network simplex (POT ``ot.emd2``; Bonneel et al. 2011). n = m = 4000 takes a few seconds."""
    import ot

    a, b = _pair(x, y)
    cost = _sq_dists(a, b)
    wa = np.full(len(a), 1.0 / len(a))
    wb = np.full(len(b), 1.0 / len(b))
    w2_sq, log = ot.emd2(wa, wb, cost, numItermax=int(num_itermax), log=True)
    if log.get("warning"):
        raise RuntimeError(f"exact optimal transport did not converge: {log['warning']} (raise num_itermax)")
    return float(np.sqrt(max(float(w2_sq), 0.0)))


def _w2_sq_1d_sorted(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared W2 between 1-D empirical measures, column by column: u (n, K), v (m, K) sorted along axis 0 -> (K,).

    W2^2 = int_0^1 (F^-1(q) - G^-1(q))^2 dq; both quantile functions are constant between the breakpoints
    {i / n} and {j / m}, kept exact as integers on the common denominator n m."""
    n, m = len(u), len(v)
    if n == m:
        return ((u - v) ** 2).mean(0)
    breaks = np.union1d(np.arange(1, n + 1) * m, np.arange(1, m + 1) * n)  # integer q * n * m
    widths = np.diff(np.concatenate([[0], breaks])) / (n * m)
    iu = (breaks + m - 1) // m - 1  # F^-1 on (q_prev, q] is u[ceil(q n) - 1]
    iv = (breaks + n - 1) // n - 1
    return (widths[:, None] * (u[iu] - v[iv]) ** 2).sum(0)


def sliced_w2(x: ArrayLike, y: ArrayLike, n_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015):

        SW2 = sqrt( E_theta [ W2^2(theta # mu, theta # nu) ] ),  theta uniform on the unit sphere,

    estimated with ``n_projections`` random directions (drawn from ``generator``); each 1-D W2 is exact."""
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    a, b = _pair(x, y)
    theta = torch.randn(n_projections, a.shape[1], generator=generator, dtype=torch.float64).numpy()
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    u = np.sort(a @ theta.T, axis=0)
    v = np.sort(b @ theta.T, axis=0)
    return float(np.sqrt(_w2_sq_1d_sorted(u, v).mean()))


# --- kernel two-sample statistics ----------------------------------------------------------------


def mmd_rbf(
    x: ArrayLike,
    y: ArrayLike,
    bandwidths: Sequence[float] | None = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    unbiased: bool = True,
) -> float:
    """Squared maximum mean discrepancy MMD^2 with k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) (Gretton et al. 2012).

    ``unbiased=True`` (default): the U-statistic (Gretton et al. 2012, Eq. 3), diagonal terms dropped; it is
    ~0 (and may be slightly negative) when x and y come from the same law. ``unbiased=False``: the V-statistic
    (Eq. 5), >= 0. ``bandwidths=None`` uses the median heuristic (one bandwidth = median pairwise distance)."""
    a, b = _pair(x, y)
    n, m = len(a), len(b)
    if unbiased and (n < 2 or m < 2):
        raise ValueError("the unbiased MMD needs at least two samples on each side")
    d_aa, d_bb, d_ab = _sq_dists(a, a), _sq_dists(b, b), _sq_dists(a, b)
    if bandwidths is None:
        bandwidths = [float(np.sqrt(np.median(d_ab)))]
    if len(bandwidths) == 0 or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be positive, got {bandwidths}")
    k_aa = sum(np.exp(-d_aa / (2.0 * h * h)) for h in bandwidths)
    k_bb = sum(np.exp(-d_bb / (2.0 * h * h)) for h in bandwidths)
    k_ab = sum(np.exp(-d_ab / (2.0 * h * h)) for h in bandwidths)
    if unbiased:
        term_aa = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
        term_bb = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    else:
        term_aa, term_bb = k_aa.mean(), k_bb.mean()
    return float(term_aa + term_bb - 2.0 * k_ab.mean())


# --- flow-map error and support precision ---------------------------------------------------------


def flow_map_rmse(pred: ArrayLike, ref: ArrayLike) -> float:
    """Root-mean-square error over all coordinates: sqrt(mean((pred - ref)^2)), pred and ref (N, ...) paired.

    For a flow map, pred = X_theta(x, s, t) and ref = the teacher's ODE solution from the same x."""
    a, b = _as_rows(pred, "pred"), _as_rows(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"pred and ref must have the same shape, got {a.shape} and {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))


def checkerboard_precision(x: ArrayLike, board: Checkerboard = CHECKERBOARD) -> float:
    """Share of samples x (N, 2) lying on an occupied cell of ``board`` (the geometry ``sample_checkerboard`` uses)."""
    a = _as_rows(x, "x")
    if a.shape[1] != 2:
        raise ValueError(f"checkerboard precision needs 2-D points, got dimension {a.shape[1]}")
    return float(board.occupied(torch.from_numpy(a)).double().mean())


# --- feature-space metrics: Frechet distance and KID ------------------------------------------------


def gaussian_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), covariance with the 1 / (N - 1) normalization."""
    f = _as_rows(feats, "feats")
    if len(f) < 2:
        raise ValueError("a covariance needs at least two feature vectors")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((c + c.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; Heusel et al. 2017, FID):

        d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)

    (Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, a symmetric PSD matrix, so an eigendecomposition suffices)."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if len(mu2) != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    root1 = _sqrtm_psd(s1)
    w = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_cross = np.sqrt(np.clip(w, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)


def frechet_distance(feat_a: ArrayLike, feat_b: ArrayLike) -> float:
    """Frechet distance (FID when the features are Inception pool features) between feature sets (N, D), (M, D)."""
    a, b = _pair(feat_a, feat_b)
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def _mmd2_unbiased_poly(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 with k(u, v) = (gamma u.v + coef0)^degree (Binkowski et al. 2018, KID)."""
    n, m = len(a), len(b)
    k_aa = (gamma * a @ a.T + coef0) ** degree
    k_bb = (gamma * b @ b.T + coef0) ** degree
    k_ab = (gamma * a @ b.T + coef0) ** degree
    term_aa = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    term_bb = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(term_aa + term_bb - 2.0 * k_ab.mean())


def kid(
    feat_a: ArrayLike,
    feat_b: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the polynomial kernel
    k(u, v) = (u.v / D + 1)^3, averaged over ``subsets`` random subsets of ``subset_size`` rows drawn
    without replacement from each set. Returns (mean, standard deviation over subsets)."""
    a, b = _pair(feat_a, feat_b)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    if subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {subset_size} exceeds the smaller feature set ({min(len(a), len(b))} rows)")
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)
    values = []
    for _ in range(subsets):
        ia = torch.randperm(len(a), generator=generator)[:subset_size].numpy()
        ib = torch.randperm(len(b), generator=generator)[:subset_size].numpy()
        values.append(_mmd2_unbiased_poly(a[ia], b[ib], degree, gamma, coef0))
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1) if subsets > 1 else 0.0)
