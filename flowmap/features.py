"""Image features for FID / KID without downloads, and a digit classifier that also labels samples.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare two image sets in the feature space
of a fixed network. The standard network is Inception-v3 (ImageNet weights), which this machine
cannot download, so the features are pluggable:

* ``ClassifierFeatures``: the penultimate layer (``feature_dim`` units) of ``DigitClassifier``, a small
  CNN the project trains on the digits' train split (``train_feature_net``; ``scripts/train_feature_net.py``);
* ``InceptionFeatures``: torchmetrics' Inception-v3 (``NoTrainInceptionV3``), built only when the user
  passes its weights file (``--inception-weights PATH``); nothing is ever downloaded.

``image_fid_kid`` hands the features to torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance``. FD values from different extractors are not comparable: reports name the
extractor (``FeatureExtractor.describe``). ``DigitClassifier.classify`` (labels (B,)) also measures which
class a conditional sample lands in (guidance tests).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmap.io import CheckpointError, load_state_strict, read_state, save_model

FEATURE_NET_KIND = "feature_net"


def _check_images(x: Tensor, data_shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 1 + len(data_shape) or tuple(x.shape[1:]) != tuple(data_shape):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} expects images (B, {', '.join(map(str, data_shape))}), got {shape}")


# --- the classifier -----------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """CNN on images (B, C, H, W) in [-1, 1], H = W even: a 3x3 convolution at full resolution, a stride-2
    one, one more at half resolution, then Linear -> ``feature_dim`` (the FID / KID features, after SiLU)
    -> Linear -> ``num_classes`` logits. No normalization layers, so train and eval modes compute the
    same function."""

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int] = (1, 8, 8),
        num_classes: int = 10,
        width: int = 16,
        feature_dim: int = 64,
    ) -> None:
        super().__init__()
        data_shape = tuple(int(d) for d in data_shape)
        if len(data_shape) != 3 or data_shape[1] != data_shape[2] or data_shape[1] % 2:
            raise ValueError(f"the digit classifier takes square images with an even side, got data_shape {data_shape}")
        if num_classes < 2 or width < 1 or feature_dim < 1:
            raise ValueError(
                f"need num_classes >= 2, width >= 1, feature_dim >= 1; got {num_classes}, {width}, {feature_dim}"
            )
        C, H, _ = data_shape
        self.config = {
            "name": "digit_cnn",
            "data_shape": list(data_shape),
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
        }
        self.data_shape, self.num_classes, self.num_features = data_shape, int(num_classes), int(feature_dim)
        self.convs = nn.Sequential(
            nn.Conv2d(C, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
        )
        self.embed = nn.Linear(2 * width * (H // 2) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim) of images (B, C, H, W); inputs are clamped to [-1, 1]."""
        _check_images(x, self.data_shape, "the digit classifier")
        h = self.convs(x.float().clamp(-1.0, 1.0))
        return F.silu(self.embed(h.flatten(1)))

    def logits(self, x: Tensor) -> Tensor:
        """(B, num_classes) class scores."""
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)

    @torch.no_grad()
    def classify(self, x: Tensor, batch: int = 1024) -> Tensor:
        """Predicted labels (B,) long."""
        return torch.cat([self.logits(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


@torch.no_grad()
def accuracy(net: DigitClassifier, x: Tensor, y: Tensor) -> float:
    """Share of images whose predicted label equals y."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(x)} images and {len(y)} labels")
    return float((net.classify(x) == y.to(x.device)).double().mean())


def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    idx = torch.arange(B)[:, None, None]
    return padded[idx, :, rows, cols].permute(0, 3, 1, 2)


def train_feature_net(
    x: Tensor,
    y: Tensor,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    max_shift: int = 1,
    noise_std: float = 0.05,
    width: int = 16,
    feature_dim: int = 64,
    num_classes: int | None = None,
) -> DigitClassifier:
    """Train a ``DigitClassifier`` on images x (N, C, H, W) in [-1, 1] with labels y (N,) long.

    Adam with a cosine learning-rate decay, cross-entropy; augmentation: random translations of up to
    ``max_shift`` pixels and Gaussian pixel noise of std ``noise_std`` (generated samples are slightly
    noisy, the features should not jump on them). Seeded: the same call returns the same network."""
    if x.dim() != 4 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need images (N, C, H, W) and labels (N,), N >= 2; got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.min() < 0:
        raise ValueError("the feature net trains on class labels; got negative (unconditional) labels")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        net = DigitClassifier(tuple(x.shape[1:]), num_classes or int(y.max()) + 1, width, feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    x, y = x.float(), y.long()
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = _shift(x[idx], max_shift, g)
        if noise_std > 0:
            xb = xb + noise_std * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(net.logits(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def save_feature_net(path: str | Path, net: DigitClassifier, **extra) -> Path:
    """safetensors with the classifier's config (and e.g. its test accuracy) in the metadata."""
    return save_model(path, net, {"kind": FEATURE_NET_KIND, "net": dict(net.config), "extra": extra})


def load_feature_net(path: str | Path) -> DigitClassifier:
    """A ``DigitClassifier`` from ``save_feature_net``'s file, in eval mode
    (``.checkpoint_config`` holds the config)."""
    state, config = read_state(path)
    if config.get("kind") != FEATURE_NET_KIND:
        raise CheckpointError(f"{path}: expected a feature-net checkpoint, found kind={config.get('kind')!r}")
    cfg = dict(config["net"])
    if cfg.pop("name", None) != "digit_cnn":
        raise CheckpointError(f"{path}: unknown feature net {config['net'].get('name')!r}")
    net = DigitClassifier(**cfg)
    load_state_strict(net, state, what=str(path))
    net.checkpoint_config = config
    return net.eval()


def digit_classifier(cache: str | Path | None = None, steps: int = 1000, seed: int = 0) -> DigitClassifier:
    """The project's digit classifier: loaded from ``cache`` when the file exists, else trained on the digits'
    train split (seeded) and, when ``cache`` is given, saved there with its test accuracy."""
    if cache is not None and Path(cache).is_file():
        return load_feature_net(cache)
    from flowmap.data.digits import load_digits_tensors

    x, y = load_digits_tensors("train")
    net = train_feature_net(x, y, steps=steps, seed=seed)
    if cache is not None:
        xt, yt = load_digits_tensors("test")
        save_feature_net(cache, net, test_accuracy=accuracy(net, xt, yt), steps=steps, seed=seed, data="digits")
    return net


# --- pluggable feature extractors -----------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """forward(images (B, *data_shape) in [-1, 1]) -> features (B, num_features) float32.

    ``name`` and ``describe()`` say which features a report used; ``num_features`` is read by torchmetrics."""

    name: str = "features"
    num_features: int = 0

    def describe(self) -> str:
        return self.name

    @torch.no_grad()
    def extract(self, x: Tensor, batch: int = 512) -> Tensor:
        """Features (N, num_features) of N images, computed in batches."""
        if len(x) == 0:
            raise ValueError("no images to extract features from")
        was = self.training
        self.eval()
        out = torch.cat([self(x[i : i + batch]).float() for i in range(0, len(x), batch)])
        self.train(was)
        return out


class ClassifierFeatures(FeatureExtractor):
    """The penultimate layer of the project's ``DigitClassifier``."""

    def __init__(self, net: DigitClassifier, source: str = "trained in this run") -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.num_features = net.num_features
        self.name = "digit_cnn"
        self.source = source

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)

    def classify(self, x: Tensor) -> Tensor:
        return self.net.classify(x)

    def describe(self) -> str:
        acc = getattr(self.net, "checkpoint_config", {}).get("extra", {}).get("test_accuracy")
        extra = f", test accuracy {acc:.3f}" if isinstance(acc, float) else ""
        return f"project digit classifier (penultimate layer, {self.num_features} features; {self.source}{extra})"


class InceptionFeatures(FeatureExtractor):
    """torchmetrics' FID Inception-v3 (2048 pool features) from a local weights file (never downloaded).

    Images in [-1, 1] with 1 or 3 channels become uint8 RGB; the network resizes them to 299 x 299 itself."""

    def __init__(self, weights_path: str | Path, feature: int = 2048) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise ValueError(
                f"--inception-weights: no such file {str(path)!r} (give the FID Inception weights, e.g. "
                "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:  # pragma: no cover - depends on the installed extras
            raise ValueError(f"Inception features need torchmetrics' image extra (torch-fidelity): {err}") from err
        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(feature)], feature_extractor_weights_path=str(path)
            )
        except Exception as err:  # missing torch-fidelity, or a file that is not the Inception weights
            raise ValueError(
                f"cannot build torchmetrics' Inception from {str(path)!r}: {type(err).__name__}: {err}"
            ) from err
        self.num_features = int(feature)
        self.name = "inception"
        self.weights_path = str(path)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.inception(img).reshape(len(x), -1)

    def describe(self) -> str:
        return f"torchmetrics Inception-v3 pool features ({self.num_features}), weights {self.weights_path}"


def build_feature_extractor(
    inception_weights: str | Path | None = None,
    classifier: DigitClassifier | None = None,
    source: str = "trained in this run",
) -> FeatureExtractor:
    """Inception when a weights file is given, otherwise the digit classifier (required then)."""
    if inception_weights:
        return InceptionFeatures(inception_weights)
    if classifier is None:
        raise ValueError("no feature extractor: pass a DigitClassifier or an Inception weights file")
    return ClassifierFeatures(classifier, source)


# --- FID / KID through torchmetrics -------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Identity "network" so torchmetrics' FID / KID accumulate features computed once by an extractor."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, f: Tensor) -> Tensor:
        return f


def fid_kid_from_features(
    real: Tensor, fake: Tensor, kid_subsets: int = 50, kid_subset_size: int = 1000
) -> dict[str, float]:
    """{"fd", "kid", "kid_std"} between feature sets (N, D) and (M, D) with torchmetrics' FrechetInceptionDistance
    and KernelInceptionDistance (polynomial kernel, degree 3); the KID subset size is capped at min(N, M)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(len(real), len(fake)) < 2:
        raise ValueError("FID / KID need at least two feature vectors on each side")
    D = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(D))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    size = min(kid_subset_size, len(real), len(fake))
    kid = KernelInceptionDistance(feature=_Precomputed(D), subsets=kid_subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fd": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "kid_subset_size": size}


def image_fid_kid(extractor: FeatureExtractor, real: Tensor, fake: Tensor, **kwargs) -> dict[str, float]:
    """FD and KID between image sets real (N, ...) and fake (M, ...) in ``extractor``'s feature space."""
    return fid_kid_from_features(extractor.extract(real), extractor.extract(fake), **kwargs)
