#!/usr/bin/env python
"""Train the project's digit classifier (FID / KID features without downloads) and report its test accuracy.

    python scripts/train_feature_net.py                                 # -> benchmarks/cache/digit_features.safetensors
    python scripts/train_feature_net.py --out runs/features.safetensors --steps 3000

Trains ``flowmap.features.DigitClassifier`` on the digits' train split (seeded), evaluates on the test
split, and saves it as safetensors with its config and test accuracy in the metadata. The benchmark
(``scripts/benchmark.py``) reuses the file when it exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flowmap.data.digits import load_digits_tensors  # noqa: E402
from flowmap.features import accuracy, save_feature_net, train_feature_net  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "cache" / "digit_features.safetensors"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output .safetensors file")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolutions")
    p.add_argument("--feature-dim", type=int, default=64, help="size of the penultimate (feature) layer")
    p.add_argument("--min-accuracy", type=float, default=0.95, help="exit with an error below this test accuracy")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    a = parse(argv)
    if not str(a.out).endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {a.out!r}")
    x, y = load_digits_tensors("train")
    xt, yt = load_digits_tensors("test")
    start = time.time()
    net = train_feature_net(
        x, y, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, width=a.width, feature_dim=a.feature_dim
    )
    train_acc, test_acc = accuracy(net, x, y), accuracy(net, xt, yt)
    save_feature_net(
        a.out, net, test_accuracy=test_acc, train_accuracy=train_acc, steps=a.steps, seed=a.seed, data="digits"
    )
    print(
        f"digit classifier: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} on {len(xt)} images "
        f"({a.steps} steps, {time.time() - start:.1f} s) -> {a.out}"
    )
    if test_acc < a.min_accuracy:
        raise ValueError(f"test accuracy {test_acc:.4f} is below --min-accuracy {a.min_accuracy}")
    return test_acc


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main_guard(main)
