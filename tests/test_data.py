"""Data sets, the registry and the DataModules: shapes, normalization, labels, determinism, DDP sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from flowmap.data import (
    CHECKERBOARD,
    CIFAR10_CLASSES,
    DATASETS,
    TOY_SETS,
    ImageFolderDataset,
    cifar10_dataset,
    get_dataset,
    load_digits_tensors,
    model_to_uint8,
    register_dataset,
    register_sampler,
    sample_eight_gaussians,
    sample_toy,
    write_image_folder,
)
from flowmap.data.toy2d import EIGHT_GAUSSIANS_STD, eight_gaussians_centers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def registry_guard():
    """Remove names a test registers."""
    before = set(DATASETS)
    yield
    for name in set(DATASETS) - before:
        DATASETS.pop(name)


# --- toy sets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_toy_shape_dtype_and_unit_scale(name):
    n = 20_000
    x = sample_toy(name, n, gen(1))
    assert x.shape == (n, 2) and x.dtype == torch.float32
    # centred (the standard error of a mean is about 1 / sqrt(n) = 0.007) with E|x|^2 = 2
    assert x.mean(0).abs().max().item() < 0.05
    assert abs((x.double() ** 2).sum(1).mean().item() - 2.0) < 0.1


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_toy_generator_reproducible(name):
    a, b, c = sample_toy(name, 100, gen(3)), sample_toy(name, 100, gen(3)), sample_toy(name, 100, gen(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_unknown_toy_name_lists_known():
    with pytest.raises(ValueError, match="checkerboard"):
        sample_toy("swissroll", 10)
    with pytest.raises(ValueError, match="non-negative"):
        sample_toy("rings", -1)


def test_checkerboard_geometry():
    assert len(CHECKERBOARD.occupied_cells()) == 8
    assert math.isclose(CHECKERBOARD.side * CHECKERBOARD.cells, 2 * CHECKERBOARD.half_width)
    a, s = CHECKERBOARD.half_width, CHECKERBOARD.side
    pts = torch.tensor(
        [[-a + 0.5 * s, -a + 0.5 * s], [-a + 1.5 * s, -a + 0.5 * s], [a + 0.1, 0.0], [-a + 1.5 * s, -a + 1.5 * s]]
    )
    assert CHECKERBOARD.occupied(pts).tolist() == [True, False, False, True]
    assert CHECKERBOARD.cell_index(pts)[2].tolist() == [-1, -1]


def test_checkerboard_samples_fill_the_eight_cells_evenly():
    x = sample_toy("checkerboard", 16_000, gen(2))
    ij = CHECKERBOARD.cell_index(x)
    assert bool(CHECKERBOARD.occupied(x).all())
    counts = torch.zeros(4, 4)
    for i, j in ij.tolist():
        counts[i, j] += 1
    shares = counts[counts > 0] / len(x)
    assert len(shares) == 8
    assert (shares - 0.125).abs().max().item() < 0.015


def test_eight_gaussians_near_centers():
    x = sample_eight_gaussians(5000, gen(0))
    d = torch.cdist(x, eight_gaussians_centers()).min(1).values
    assert d.max().item() < 6 * EIGHT_GAUSSIANS_STD
    # the distance to the nearest centre is Rayleigh with scale sigma: mean sigma sqrt(pi / 2)
    assert abs(d.mean().item() - EIGHT_GAUSSIANS_STD * math.sqrt(math.pi / 2)) < 0.01


# --- digits --------------------------------------------------------------------------------------


def test_digits_shapes_range_labels_and_split():
    xtr, ytr = load_digits_tensors("train", seed=0)
    xte, yte = load_digits_tensors("test", seed=0)
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert len(xtr) + len(xte) == 1797 and abs(len(xte) - 0.2 * 1797) <= 1
    both = torch.cat([xtr, xte])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    assert sorted(set(ytr.tolist())) == list(range(10)) and sorted(set(yte.tolist())) == list(range(10))
    # disjoint split: the test images are not among the train images
    flat_tr = {tuple(r) for r in xtr.flatten(1).tolist()}
    n_shared = sum(tuple(r) in flat_tr for r in xte.flatten(1).tolist())
    assert n_shared < 5  # a handful of exact duplicate digits exist in the raw data
    assert torch.equal(load_digits_tensors("test", seed=0)[1], yte)
    assert not torch.equal(load_digits_tensors("test", seed=1)[1], yte)


def test_digits_resize_and_bad_split():
    x, _ = load_digits_tensors("all", image_size=16)
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="split"):
        load_digits_tensors("validation")


# --- image folders and CIFAR-10 as files -----------------------------------------------------------


def _random_images(n, h=5, w=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_image_folder_roundtrip(tmp_path):
    imgs = _random_images(6)
    labels = [0, 1, 0, 1, 1, 0]
    write_image_folder(imgs, labels, tmp_path / "data", classes=["cat", "dog"])
    ds = ImageFolderDataset(tmp_path / "data")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and ds.data_shape == (3, 5, 6) and len(ds) == 6
    # PNG is lossless: every item is v / 127.5 - 1 of the written pixels (in [-1, 1]), with its label
    expected = {img.tobytes(): lab for img, lab in zip(imgs, labels)}
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.min() >= -1 and x.max() <= 1
        pixels = model_to_uint8(x).permute(1, 2, 0).numpy()
        assert torch.allclose(x, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
        assert expected[pixels.tobytes()] == int(y)


def test_image_folder_resize_grayscale_flat_and_errors(tmp_path):
    write_image_folder(_random_images(3, h=10, w=14), None, tmp_path / "flat")
    ds = ImageFolderDataset(tmp_path / "flat", image_size=4, channels=1)
    x, y = ds[0]
    assert x.shape == (1, 4, 4) and int(y) == -1 and ds.num_classes == 0
    assert x.min() >= -1 and x.max() <= 1
    write_image_folder(_random_images(1, h=7, w=7, seed=1), None, tmp_path / "flat")
    mixed = ImageFolderDataset(tmp_path / "flat")
    with pytest.raises(ValueError, match="image_size"):
        [mixed[i] for i in range(len(mixed))]
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_cifar10_npz_and_png_layouts(tmp_path):
    x = _random_images(12, h=8, w=8)
    y = np.arange(12) % 10
    np.savez(tmp_path / "train.npz", x=x, y=y)
    ds = cifar10_dataset(tmp_path, "train")
    xi, yi = ds[3]
    assert xi.shape == (3, 8, 8) and int(yi) == 3
    assert torch.allclose(xi, torch.from_numpy(x[3]).permute(2, 0, 1).float() / 127.5 - 1)
    write_image_folder(x, y, tmp_path / "png" / "test", classes=CIFAR10_CLASSES)
    ds_png = cifar10_dataset(tmp_path / "png", "test")
    assert len(ds_png) == 12 and ds_png.num_classes == 10
    assert sorted(ds_png.labels.tolist()) == sorted(y.tolist())
    src = get_dataset("cifar10", root=str(tmp_path))
    assert src.data_shape == (3, 8, 8) and src.num_classes == 10 and not src.has_split("val")
    with pytest.raises(ValueError, match="test"):
        cifar10_dataset(tmp_path, "test")
    np.savez(tmp_path / "bad.npz", x=np.array([object()], dtype=object))
    with pytest.raises(ValueError):
        cifar10_dataset(tmp_path / "bad.npz")


def test_cifar10_png_unknown_class_folder(tmp_path):
    write_image_folder(_random_images(2), [0, 1], tmp_path / "train", classes=["airplane", "unicorn"])
    with pytest.raises(ValueError, match="unicorn"):
        cifar10_dataset(tmp_path, "train")


# --- registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_registry_toy_sources(name):
    src = get_dataset(name, n_train=300, n_val=100, seed=5)
    assert src.data_shape == (2,) and src.num_classes == 0 and src.can_sample
    x, y = src.tensors("train")
    xv, _ = src.tensors("val")
    assert x.shape == (300, 2) and xv.shape == (100, 2) and bool((y == -1).all())
    assert torch.equal(x, get_dataset(name, n_train=300, n_val=100, seed=5).tensors("train")[0])
    assert not torch.allclose(x[:100], xv)
    assert src.sample(7, gen(0)).shape == (7, 2)


def test_registry_errors(registry_guard):
    with pytest.raises(ValueError, match="digits"):
        get_dataset("imagenet")
    with pytest.raises(ValueError, match="bad arguments"):
        get_dataset("checkerboard", n_points=3)
    with pytest.raises(ValueError, match="cannot draw fresh samples"):
        get_dataset("digits").sample(3)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("checkerboard", lambda: None)
    register_dataset("broken", "no_such_module_xyz:factory")
    with pytest.raises(ValueError, match="cannot import"):
        get_dataset("broken")


def test_register_conditional_sampler_and_string_factory(registry_guard):
    def sampler(n, generator=None):
        y = torch.randint(0, 3, (n,), generator=generator)
        return torch.randn(n, 4, generator=generator) + y[:, None].float(), y

    register_sampler("toy_cond", sampler, data_shape=(4,), num_classes=3)
    src = get_dataset("toy_cond", n_train=600, n_val=0)
    x, y = src.tensors("train")
    assert src.num_classes == 3 and x.shape == (600, 4) and set(y.tolist()) == {0, 1, 2}
    assert torch.allclose(x[y == 2].mean(0), torch.full((4,), 2.0), atol=0.3)
    register_dataset("digits_by_path", "flowmap.data.registry:_digits")
    assert get_dataset("digits_by_path").num_classes == 10


def test_entry_point_data_set_is_found_on_first_request(tmp_path, monkeypatch, registry_guard):
    """A package declaring ``digits_ep = "flowmap.data.registry:_digits"`` in the flowmap.datasets entry-point group
    (an installed distribution's metadata on sys.path) is found by name; an unknown name lists the known sets."""
    info = tmp_path / "flowmap_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowmap-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flowmap.datasets]\ndigits_ep = flowmap.data.registry:_digits\n")
    assert "digits_ep" not in DATASETS
    with pytest.raises(ValueError, match=r"unknown data set 'digits_ep'; known: \[.*'digits'.*flowmap\.datasets"):
        get_dataset("digits_ep")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_dataset("digits_ep").num_classes == 10 and get_dataset("digits_ep").data_shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"known: \[.*'digits_ep'"):
        get_dataset("no_such_set")


def test_tensor_file(tmp_path):
    from flowmap.data import load_tensor_file

    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(20) % 4)
    torch.save({"x": torch.from_numpy(x)}, tmp_path / "s.pt")
    xa, ya = load_tensor_file(tmp_path / "s.npz")
    xb, yb = load_tensor_file(tmp_path / "s.pt")
    assert torch.equal(xa, xb) and yb is None and ya.tolist() == (np.arange(20) % 4).tolist()
    src = get_dataset("tensor_file", path=str(tmp_path / "s.npz"), val_fraction=0.25)
    assert src.num_classes == 4 and len(src.tensors("train")[0]) == 15 and len(src.tensors("val")[0]) == 5
    with pytest.raises(ValueError, match="unsupported"):
        load_tensor_file(_touch(tmp_path / "s.csv"))


def _touch(p):
    p.write_text("1,2\n")
    return p


# --- DataModules ---------------------------------------------------------------------------------


def test_toy_datamodule_batches():
    from flowmap.lightning.batches import unpack_batch
    from flowmap.lightning.datamodules import ToyDataModule

    dm = ToyDataModule("spirals", n_train=1000, n_val=50, batch_size=64, seed=1)
    assert dm.data_shape == (2,) and dm.num_classes == 0
    dl = dm.train_dataloader()
    batches = list(dl)
    assert len(batches) == 1000 // 64 and all(b[0].shape == (64, 2) for b in batches)
    x0, cond = unpack_batch(batches[0])
    assert x0.shape == (64, 2) and cond is None
    again = next(iter(ToyDataModule("spirals", n_train=1000, n_val=50, batch_size=64, seed=1).train_dataloader()))
    assert torch.equal(again[0], batches[0][0])
    assert dm.val_tensors()[0].shape == (50, 2)


def test_toy_datamodule_fresh_samples():
    from flowmap.lightning.datamodules import ToyDataModule

    dm = ToyDataModule("checkerboard", n_train=256, batch_size=128, fresh=True, seed=0)
    dl = dm.train_dataloader()
    e1, e2 = torch.cat([b[0] for b in dl]), torch.cat([b[0] for b in dl])
    assert e1.shape == (256, 2) and not torch.allclose(e1, e2)
    assert CHECKERBOARD.occupied(torch.cat([e1, e2])).all()


def test_digits_and_image_folder_datamodules(tmp_path):
    from flowmap.lightning.batches import unpack_batch
    from flowmap.lightning.datamodules import DigitsDataModule, ImageFolderDataModule, TensorDataModule

    dm = DigitsDataModule(batch_size=100, seed=0)
    assert dm.data_shape == (1, 8, 8) and dm.num_classes == 10
    x0, cond = unpack_batch(next(iter(dm.train_dataloader())))
    assert x0.shape == (100, 1, 8, 8) and cond.dtype == torch.long and 0 <= cond.min() and cond.max() <= 9
    unc = DigitsDataModule(batch_size=100, class_conditional=False)
    assert unc.num_classes == 0 and unpack_batch(next(iter(unc.train_dataloader())))[1] is None

    write_image_folder(_random_images(8, h=6, w=6), [0, 1, 2, 0, 1, 2, 0, 1], tmp_path / "imgs")
    im = ImageFolderDataModule(str(tmp_path / "imgs"), image_size=4, batch_size=4)
    assert im.data_shape == (3, 4, 4) and im.num_classes == 3
    assert len(im.train_dataloader()) == 2

    np.savez(tmp_path / "t.npz", x=np.zeros((10, 2, 3), np.float32))
    tm = TensorDataModule(str(tmp_path / "t.npz"), batch_size=4)
    assert tm.data_shape == (2, 3) and tm.num_classes == 0 and len(tm.train_dataloader()) == 2
    with pytest.raises(ValueError, match="fewer than one batch"):
        TensorDataModule(str(tmp_path / "t.npz"), batch_size=11).train_dataloader()


@pytest.mark.parametrize("fresh", [False, True])
def test_datamodule_ddp_sharding(fresh):
    """What Lightning does under DDP: the same loader with a DistributedSampler per rank."""
    from lightning.pytorch.utilities.data import _update_dataloader

    from flowmap.lightning.datamodules import ToyDataModule

    dm = ToyDataModule("rings", n_train=1000, batch_size=64, fresh=fresh)
    dl = dm.train_dataloader()
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(dl.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        per_rank.append(list(_update_dataloader(dl, sampler)))
    assert len(per_rank[0]) == len(per_rank[1]) == 500 // 64
    assert all(b[0].shape == (64, 2) for b in per_rank[0] + per_rank[1])
    a, b = torch.cat([x for x, _ in per_rank[0]]), torch.cat([x for x, _ in per_rank[1]])
    assert torch.cdist(a, b).min().item() > 0  # the ranks see different samples


def test_datamodule_in_trainer(tmp_path):
    import lightning as L

    from flowmap.lightning.batches import unpack_batch
    from flowmap.lightning.datamodules import DigitsDataModule

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            x0, cond = unpack_batch(batch)
            self.seen.append((tuple(x0.shape), cond.dtype))
            return ((x0.mean() - self.w) ** 2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Probe()
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert model.seen == [((32, 1, 8, 8), torch.long)] * 3
