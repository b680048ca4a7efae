"""The project's digit classifier (flowmap/features.py): it classifies held-out digits, its features
separate real digits from noise, torchmetrics' FD / KID on them equal our own formulas, files round-trip,
and the Inception path never downloads."""

from __future__ import annotations

import time

import pytest
import torch

from flowmap.data.digits import load_digits_tensors
from flowmap.features import (
    ClassifierFeatures,
    DigitClassifier,
    InceptionFeatures,
    accuracy,
    build_feature_extractor,
    fid_kid_from_features,
    image_fid_kid,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from flowmap.io import CheckpointError, save_model
from flowmap.metrics import frechet_distance, kid


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    x, y = load_digits_tensors("train")
    t0 = time.time()
    net = train_feature_net(x, y, steps=400, seed=0)
    return net, time.time() - t0


def test_classifier_beats_95_percent_on_held_out_digits(trained):
    net, seconds = trained
    xt, yt = load_digits_tensors("test")
    acc = accuracy(net, xt, yt)
    print(f"digit classifier: test accuracy {acc:.4f} on {len(xt)} images after 400 steps ({seconds:.1f} s)")
    assert acc > 0.95
    # chance level for an untrained net of the same shape: the accuracy comes from training
    assert accuracy(DigitClassifier(), xt, yt) < 0.5
    labels = net.classify(xt)
    assert labels.shape == (len(xt),) and labels.dtype == torch.long


def test_features_separate_digits_from_noise_and_match_our_formulas(trained):
    net, _ = trained
    ext = ClassifierFeatures(net)
    x, _ = load_digits_tensors("train")
    xt, _ = load_digits_tensors("test")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(xt), 1, 8, 8, generator=g).clamp(-1, 1)
    f_train, f_test, f_noise = ext.extract(x), ext.extract(xt), ext.extract(noise)
    assert f_train.shape == (len(x), net.num_features)
    real = fid_kid_from_features(f_train, f_test, kid_subsets=20, kid_subset_size=200)
    fake = fid_kid_from_features(f_train, f_noise, kid_subsets=20, kid_subset_size=200)
    print(
        f"FD test vs train {real['fd']:.3f}, noise vs train {fake['fd']:.3f}; "
        f"KID {real['kid']:.4f} vs {fake['kid']:.4f}"
    )
    assert fake["fd"] > 20 * real["fd"]
    assert fake["kid"] > 20 * abs(real["kid"])
    # torchmetrics' FD on our features equals flowmap.metrics.frechet_distance (independent eigen-based code)
    ours = frechet_distance(f_train, f_test)
    assert real["fd"] == pytest.approx(ours, rel=1e-5)
    # KID with one subset holding every row is the full unbiased MMD^2: equals flowmap.metrics.kid
    n = len(xt)
    full = fid_kid_from_features(f_train[:n], f_noise, kid_subsets=1, kid_subset_size=n)
    assert full["kid"] == pytest.approx(kid(f_train[:n], f_noise, subsets=1, subset_size=n)[0], rel=1e-6)
    # the image-level helper is the same computation
    direct = image_fid_kid(ext, x, xt, kid_subsets=5, kid_subset_size=100)
    assert direct["fd"] == pytest.approx(real["fd"], rel=1e-6)


def test_save_load_round_trip_and_wrong_files(trained, tmp_path):
    net, _ = trained
    path = save_feature_net(tmp_path / "f.safetensors", net, test_accuracy=0.97)
    back = load_feature_net(path)
    xt, _ = load_digits_tensors("test")
    assert torch.equal(back.features(xt), net.features(xt))
    assert back.checkpoint_config["extra"]["test_accuracy"] == 0.97
    assert "test accuracy 0.970" in ClassifierFeatures(back).describe()
    other = save_model(
        tmp_path / "other.safetensors", torch.nn.Linear(2, 2), {"kind": "teacher", "net": {"name": "mlp"}}
    )
    with pytest.raises(CheckpointError, match="feature-net"):
        load_feature_net(other)


def test_bad_input_is_one_clear_error(tmp_path):
    net = DigitClassifier()
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 8, 8\)"):
        net.features(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="even side"):
        DigitClassifier((1, 7, 7))
    with pytest.raises(ValueError, match="negative"):
        train_feature_net(torch.zeros(4, 1, 8, 8), torch.full((4,), -1), steps=1)
    with pytest.raises(ValueError, match="same D"):
        fid_kid_from_features(torch.zeros(5, 3), torch.zeros(5, 4))
    # Inception is built only from a local weights file: a missing file is named, nothing is downloaded
    with pytest.raises(ValueError, match="no such file"):
        InceptionFeatures(tmp_path / "missing.pth")
    garbage = tmp_path / "not_inception.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="cannot build torchmetrics' Inception"):
        InceptionFeatures(garbage)
    with pytest.raises(ValueError, match="no feature extractor"):
        build_feature_extractor(None, None)
