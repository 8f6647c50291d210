"""Trains coat_lite_tiny from scratch on the CIFAR-10 JPEGs at 32 px and prints test top-1 against epochs and time.

Not a unit test: it runs for minutes to hours. The tar (../shared/data/cifar10-jpeg.tar.gz, ImageFolder layout
cifar10/train, cifar10/test) is extracted to a temporary folder. `--steps-per-epoch` makes "epochs" shorter than a
pass over the 50,000 training images, so a CPU run still shows a curve; `--test-images` evaluates on an evenly
spaced subset of the 10,000 test images (stated in the output).

    python benchmarks/cifar10_train.py --minutes 15 --threads 1            # CPU, shared machine
    python benchmarks/cifar10_train.py --epochs 100 --batch-size 256 --amp  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def subset_test(root: Path, n: int) -> Path:
    """A test/ folder with every k-th image of each class (symlinks), n images in all."""
    src = root / "test"
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    per_class = max(1, n // len(classes))
    dst = root / f"test{n}"
    for c in classes:
        files = sorted((src / c).iterdir())
        step = max(1, len(files) // per_class)
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in files[::step][:per_class]:
            (dst / c / f.name).symlink_to(f)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tar", default=str(DEFAULT_TAR))
    p.add_argument("--model", default="coat_lite_tiny")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--minutes", type=float, help="stop after the epoch that passes this wall time")
    p.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch (default: a full pass)")
    p.add_argument("--test-images", type=int, default=10000, help="evaluate on this many test images")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--recipe", choices=("light", "paper"), default="light",
                   help="light: RandomResizedCrop(0.35-1) + flip + label smoothing (small data, few epochs); "
                        "paper: the full ImageNet recipe (RandAugment, mixup/cutmix, erasing, repeats)")
    p.add_argument("--threads", type=int)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None, help="keep the run directory here (default: a temp folder)")
    args = p.parse_args()

    import torch

    from coatvit.runtime import tune_cpu_allocator
    from coatvit.train import TrainConfig, read_csv, train

    tune_cpu_allocator()  # as `coatvit train` does

    tmp = tempfile.TemporaryDirectory(prefix="cifar10-")
    root = Path(tmp.name)
    t0 = time.perf_counter()
    with tarfile.open(args.tar) as tar:
        tar.extractall(root, filter="data")
    data = root / "cifar10"
    if args.test_images < 10000:
        (data / "val").symlink_to(subset_test(data, args.test_images), target_is_directory=True)
    print(f"extracted {args.tar} in {time.perf_counter() - t0:.1f}s", flush=True)

    light = dict(aa="none", mixup=0.0, cutmix=0.0, reprob=0.0, aug_repeats=1, scale=(0.35, 1.0), drop_path=0.0,
                 model_ema=False, smoothing=0.1)
    cfg = TrainConfig(
        model=args.model, data=str(data), img_size=(32, 32), epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, warmup_epochs=args.warmup_epochs, workers=args.workers, threads=args.threads,
        amp=args.amp, amp_dtype="float16" if torch.cuda.is_available() else "bfloat16", device=args.device,
        crop_pct=1.0,
        max_steps_per_epoch=args.steps_per_epoch, output=args.output or str(root / "runs"), experiment="cifar10",
        log_interval=100, curves=args.output is not None, **(light if args.recipe == "light" else {}))
    deadline = None if args.minutes is None else time.perf_counter() + 60 * args.minutes

    import coatvit.train as train_mod

    if deadline is not None:
        # Stop cleanly after the first epoch that ends past the deadline (its row and checkpoint are written).
        real_append = train_mod.append_csv

        def append_then_check(path, row):
            real_append(path, row)
            if time.perf_counter() > deadline:
                raise TimeoutError

        train_mod.append_csv = append_then_check
    start = time.perf_counter()
    try:
        train(cfg, argv=["benchmarks/cifar10_train.py"])
    except TimeoutError:
        pass
    rows = read_csv(Path(cfg.output) / "cifar10" / "summary.csv")
    images_per_epoch = (args.steps_per_epoch or 50000 // args.batch_size) * args.batch_size
    print()
    print("| epoch | train images seen | test top-1 (%) | test top-5 (%) | train img/s | wall (min) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        e = int(r["epoch"])
        print(f"| {e + 1} | {(e + 1) * images_per_epoch:,} | {float(r['eval_top1']):.2f} | "
              f"{float(r['eval_top5']):.2f} | {float(r['images_per_s']):.1f} | {float(r['wall_time_s']) / 60:.1f} |")
    n_test = args.test_images if args.test_images < 10000 else 10000
    info = {"model": args.model, "recipe": args.recipe, "batch_size": args.batch_size, "lr": args.lr,
            "test_images": n_test, "wall_min": round((time.perf_counter() - start) / 60, 2),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "device": args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
