"""The analytic Gaussian-mixture teacher: exact velocity for any means, covariances and weights.

Data x0 ~ sum_k pi_k N(mu_k, S_k). On an affine path x_t = alpha x0 + sigma eps, component k gives
x_t ~ N(alpha mu_k, C_k) with C_k = alpha^2 S_k + sigma^2 I, and the Gaussian posterior means
(e.g. Bishop 2006, Eq. 2.116) are

    E[eps | x_t, k] = sigma C_k^{-1} (x_t - alpha mu_k)
    E[x0 | x_t, k]  = mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k)

so the probability-flow velocity is v(x, t) = sum_k r_k(x) (alpha' E[x0|x,k] + sigma' E[eps|x,k]) with
responsibilities r_k proportional to pi_k N(x; alpha mu_k, C_k). The exact flow map is a float64 RK4
solve of this field with a tight step (``flow_map``), the reference every distillation test uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from flowmap.paths import AffinePath
from flowmap.solvers import ode_step
from flowmap.teacher import Teacher
from flowmap.types import check_labels, expand_like


class GaussianMixtureTeacher(Teacher):
    """means (K, D), covs (K, D, D) symmetric positive definite, weights (K,), labels (K,) long or None.

    With labels, the teacher is class-conditional: cond = c restricts the mixture to the components
    labelled c, and the null label (= num_classes) or cond=None uses the whole mixture."""

    def __init__(
        self, means: Tensor, covs: Tensor, weights: Tensor | None = None, labels: Tensor | None = None
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        if covs.dim() == 1:  # per-component isotropic std
            covs = covs[:, None, None] ** 2 * torch.eye(D, dtype=torch.float64)
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must be (K, D, D) = ({K}, {D}, {D}), got {tuple(covs.shape)}")
        if not torch.allclose(covs, covs.transpose(1, 2)) or torch.linalg.eigvalsh(covs).min() <= 0:
            raise ValueError("covariances must be symmetric positive definite")
        weights = (
            torch.full((K,), 1.0 / K, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if weights.shape != (K,) or torch.any(weights <= 0):
            raise ValueError(f"weights must be (K,) = ({K},) positive numbers")
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("weights", weights / weights.sum())
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (K,) or labels.min() < 0:
                raise ValueError(f"labels must be (K,) = ({K},) non-negative ints")
            self.register_buffer("labels", labels)
            self.num_classes = int(labels.max()) + 1
        else:
            self.labels = None
            self.num_classes = 0
        self.data_shape = (D,)

    # ---- construction and files -------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"means": self.means.tolist(), "covs": self.covs.tolist(), "weights": self.weights.tolist()}
        if self.labels is not None:
            out["labels"] = self.labels.tolist()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the mixture as JSON (means, covs, weights, labels)."""
        from flowmap.io import atomic_write

        path = Path(path)
        data = json.dumps(self.to_dict()).encode()
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> "GaussianMixtureTeacher":
        """Load a mixture from JSON written by ``save`` (keys means, covs, weights, optional labels)."""
        try:
            spec = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a Gaussian mixture from {path}: {err}") from None
        missing = {"means", "covs"} - set(spec)
        if missing:
            raise ValueError(f"{path}: a mixture file needs keys means and covs; missing {sorted(missing)}")
        f64 = torch.float64  # JSON holds float64 values; torch.tensor's default float32 would round them
        return cls(
            torch.tensor(spec["means"], dtype=f64),
            torch.tensor(spec["covs"], dtype=f64),
            spec.get("weights"),
            spec.get("labels"),
        )

    # ---- data -------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """n float32 samples (n, D) of the data distribution (of class ``cond`` when given)."""
        return self.sample_labeled(n, generator, cond)[0]

    def sample_labeled(
        self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x0 (n, D) float32, labels (n,) long: component label, or -1 for an unlabelled mixture)."""
        dev = self.means.device
        check_labels(cond, self.num_classes, n)
        if cond is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            probs = self._component_weights(cond.to(dev))  # (n, K)
            k = torch.multinomial(probs, 1, generator=generator)[:, 0]
        z = torch.randn(n, self.data_shape[0], generator=generator, dtype=torch.float64, device=dev)
        L = torch.linalg.cholesky(self.covs)
        x = self.means[k] + (L[k] @ z[:, :, None])[:, :, 0]
        y = self.labels[k] if self.labels is not None else torch.full((n,), -1, dtype=torch.long, device=dev)
        return x.float(), y

    def _component_weights(self, cond: Tensor | None) -> Tensor:
        """(B, K) prior weights, restricted to the components of each label."""
        if cond is None or self.labels is None:
            return self.weights[None]
        mask = (self.labels[None, :] == cond[:, None]) | (cond[:, None] == self.num_classes)
        w = self.weights[None] * mask
        return w / w.sum(1, keepdim=True)

    # ---- velocity ---------------------------------------------------------------------------
    def exact_velocity(self, x: Tensor, t: Tensor, path: AffinePath, cond: Tensor | None = None) -> Tensor:
        """Exact probability-flow velocity on any affine ``path`` at its own time t: (B, D), computed in float64."""
        xd, td = x.double(), t.double()
        a, s = path.alpha(td), path.sigma(td)  # (B,)
        da, ds = path.d_alpha(td), path.d_sigma(td)
        D = self.data_shape[0]
        eye = torch.eye(D, dtype=torch.float64, device=x.device)
        C = a[:, None, None, None] ** 2 * self.covs[None] + s[:, None, None, None] ** 2 * eye  # (B, K, D, D)
        r = xd[:, None, :] - a[:, None, None] * self.means[None]  # (B, K, D)
        L = torch.linalg.cholesky(C)
        Cinv_r = torch.cholesky_solve(r[..., None], L)[..., 0]  # (B, K, D)
        maha = (r * Cinv_r).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logp = torch.log(self._component_weights(cond).clamp_min(1e-300)) - 0.5 * (maha + logdet)
        resp = torch.softmax(logp, dim=1)  # (B, K)
        e_eps = s[:, None, None] * Cinv_r
        e_x0 = self.means[None] + a[:, None, None] * (self.covs[None] @ Cinv_r[..., None])[..., 0]
        v_k = da[:, None, None] * e_x0 + ds[:, None, None] * e_eps
        return (resp[..., None] * v_k).sum(1).to(x.dtype)

    def path_velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The teacher type's part of ``Teacher``: the exact velocity on ``self.path`` (the linear path) at t."""
        return self.exact_velocity(x, t, self.path, cond)

    # ---- exact flow map ---------------------------------------------------------------------
    @torch.no_grad()
    def flow_map(
        self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0, steps: int = 200
    ) -> Tensor:
        """X(x, s, t): float64 RK4 with ``steps`` steps per sample (error ~1e-9 on smooth mixtures)."""
        xd = x.double()
        sd, td = s.double(), t.double()
        h = (td - sd) / steps
        hx = expand_like(h, xd)

        def f(y: Tensor, tau: Tensor) -> Tensor:
            return self._v64(y, tau, cond, guidance)

        for i in range(steps):
            xd = ode_step("rk4", f, xd, sd + i * h, h, hx=hx)
        return xd.to(x.dtype)

    def _v64(self, x: Tensor, t: Tensor, cond: Tensor | None, guidance: float) -> Tensor:
        return self.velocity(x, t.clamp(0, 1), cond, guidance)


def is_mixture_file(path: Path) -> bool:
    """Whether ``path`` is a JSON object with a mixture's ``means`` and ``covs`` (what ``save`` writes)."""
    try:
        if not path.is_file() or path.stat().st_size > 2**26:
            return False
        with open(path, "rb") as f:
            if f.read(1).lstrip() not in (b"{",):
                return False
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(spec, dict) and {"means", "covs"} <= set(spec)


def load_mixture(path: Path) -> tuple[GaussianMixtureTeacher, dict]:
    """(teacher, description) of a mixture file, as ``teachers.load_teacher`` returns them."""
    mix = GaussianMixtureTeacher.from_file(path)
    description = {
        "kind": "mixture",
        "source": str(path),
        "name": Path(path).name,
        "model": f"{len(mix.means)} Gaussians",
        "prediction": "velocity (exact)",
        "path": mix.path.name,
        "data_shape": list(mix.data_shape),
        "num_classes": mix.num_classes,
        "null_class": mix.num_classes > 0,
    }
    return mix, description


def preset_mixture(name: str = "ring8", dim: int = 2) -> GaussianMixtureTeacher:
    """Named mixtures used by tests, configs and the benchmark.

    ring8: 8 anisotropic Gaussians on a circle of radius 2 (2-D, labels = ring index mod 2 classes);
    grid4: 4 Gaussians on a 2x2 grid with unequal weights (unlabelled);
    highdim: 4 Gaussians in ``dim`` dimensions;
    aniso2d: 5 elongated 2-D Gaussians (axis ratios 5-15, each turned its own way) with weights 0.35 to 0.07;
    scales16: 6 Gaussians in 16-D (``dim`` >= 16 overrides) with full covariances of scales 0.05 to 0.6 and
    weights 0.3 to 0.05, means of norm ~2.5 (unlabelled; both about unit variance per coordinate)."""
    g = torch.Generator().manual_seed(0)
    if name == "ring8":
        ang = torch.arange(8, dtype=torch.float64) * (2 * torch.pi / 8)
        means = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        rot = torch.stack(
            [torch.stack([torch.cos(ang), -torch.sin(ang)], 1), torch.stack([torch.sin(ang), torch.cos(ang)], 1)], 1
        )
        diag = torch.diag(torch.tensor([0.08, 0.02], dtype=torch.float64))
        covs = rot @ diag @ rot.transpose(1, 2)
        return GaussianMixtureTeacher(means, covs, None, torch.arange(8) % 2)
    if name == "grid4":
        means = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
        return GaussianMixtureTeacher(means, torch.full((4,), 0.3), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    if name == "highdim":
        means = torch.randn(4, dim, generator=g, dtype=torch.float64)
        return GaussianMixtureTeacher(means, torch.full((4,), 0.5))
    if name == "aniso2d":
        means = torch.tensor([[-1.6, -0.8], [1.2, -1.2], [0.4, 1.4], [-1.0, 1.2], [1.8, 0.6]], dtype=torch.float64)
        ang = torch.tensor([0.3, -0.9, 1.4, 0.6, 2.2], dtype=torch.float64)
        rot = torch.stack(
            [torch.stack([torch.cos(ang), -torch.sin(ang)], 1), torch.stack([torch.sin(ang), torch.cos(ang)], 1)], 1
        )
        var = torch.tensor([[0.45, 0.002], [0.30, 0.012], [0.20, 0.004], [0.10, 0.02], [0.25, 0.005]])
        covs = rot @ torch.diag_embed(var.double()) @ rot.transpose(1, 2)
        return GaussianMixtureTeacher(means, covs, torch.tensor([0.35, 0.25, 0.18, 0.15, 0.07]))
    if name == "scales16":
        D, K = max(dim, 16), 6
        means = torch.randn(K, D, generator=g, dtype=torch.float64)
        means = 2.5 * means / means.norm(dim=1, keepdim=True)
        scales = torch.tensor([0.6, 0.4, 0.25, 0.15, 0.1, 0.05], dtype=torch.float64)
        A = torch.randn(K, D, D, generator=g, dtype=torch.float64) / D**0.5
        covs = scales[:, None, None] ** 2 * (A @ A.transpose(1, 2) + 0.25 * torch.eye(D, dtype=torch.float64)) / 1.25
        return GaussianMixtureTeacher(means, covs, torch.tensor([0.3, 0.2, 0.2, 0.15, 0.1, 0.05]))
    raise ValueError(
        f"unknown mixture preset {name!r}; choose from ['aniso2d', 'grid4', 'highdim', 'ring8', 'scales16']"
    )


class PresetMixture(GaussianMixtureTeacher):
    """A named (or file-loaded) mixture with a plain constructor, for YAML configs:
    ``{"class_path": "teachers.PresetMixture", "init_args": {"name": "ring8"}}``."""

    def __init__(self, name: str = "ring8", path: str | None = None, dim: int = 2) -> None:
        src = GaussianMixtureTeacher.from_file(path) if path else preset_mixture(name, dim)
        super().__init__(src.means, src.covs, src.weights, src.labels)


def gmm_source(
    preset: str = "ring8",
    path: str | None = None,
    dim: int = 2,
    n_train: int = 50_000,
    n_val: int = 5_000,
    seed: int = 0,
    labels: bool = True,
):
    """The mixture's own samples as a registered data set (``get_dataset("gmm", preset="ring8")``), so that
    data-driven objectives and DataModules can train on exactly the distribution the teacher models
    (``labels=False``: without the components' labels, an unconditional set)."""
    from flowmap.data.registry import SampledSource

    mix = PresetMixture(preset, path, dim)
    return SampledSource(
        f"gmm:{preset if path is None else path}",
        mix.sample_labeled if labels else mix.sample,
        mix.data_shape,
        mix.num_classes if labels else 0,
        n_train=n_train,
        n_val=n_val,
        seed=seed,
    )
