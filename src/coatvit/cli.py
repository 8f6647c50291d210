"""The `coatvit` command: argparse subcommands, each a thin call into a library module.

Known errors (`CoaTError` and friends) become one line on stderr and exit code 2; `--debug` shows the traceback.
Every subcommand registers itself in `COMMANDS` through `add_<name>_parser`; nothing below imports this module.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import logging
import os
import re
import sys
from typing import Any, Callable

COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], Callable]] = {}


def command(name: str):
    """Registers `(add_parser, run)` for a subcommand; `add_parser` returns its parser."""

    def wrap(add_parser):
        def register(run):
            COMMANDS[name] = (add_parser, run)
            return run

        return register

    return wrap


class UsageError(Exception):
    """A bad invocation the CLI itself detects (exit code 2, one line)."""


def emit(record: Any, fmt: str) -> None:
    """Prints a result as JSON (one object per line) or as readable text."""
    if fmt == "json":
        print(json.dumps(record, default=str))
    elif isinstance(record, dict):
        width = max(len(k) for k in record) if record else 0
        for k, v in record.items():
            print(f"{k:<{width}}  {v}")
    else:
        print(record)


def add_format(p: argparse.ArgumentParser, choices=("table", "json")) -> None:
    p.add_argument("--format", choices=choices, default=choices[0], help="output format (json for scripts)")


def add_img_size(p: argparse.ArgumentParser, default=None) -> None:
    p.add_argument("--img-size", type=int, nargs="+", default=default, metavar="PX",
                   help="input size: one number (square) or H W")


def img_size_arg(value, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    if len(value) == 1:
        value = [value[0], value[0]]
    if len(value) != 2 or min(value) <= 0:
        raise UsageError(f"--img-size takes one or two positive integers (H W), got {value}")
    return int(value[0]), int(value[1])


# ----------------------------------------------------------------------------------------------------------------
# list / info


def _add_list(sub):
    p = sub.add_parser("list", help="list the models", description="List registered CoaT models.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter, e.g. 'coat_lite*'")
    p.add_argument("--pretrained", action="store_true", help="only models with released weights")
    add_format(p)
    return p


@command("list")(_add_list)
def run_list(args) -> int:
    from .config import PRETRAINED
    from .registry import list_models

    for name in list_models(args.pattern, pretrained=args.pretrained):
        entry = PRETRAINED.get(name)
        if args.format == "json":
            emit({"model": name, "pretrained": entry.hub_id if entry else None}, "json")
        else:
            print(f"{name:<22}{'  ' + entry.hub_id if entry else ''}")
    return 0


def _add_info(sub):
    p = sub.add_parser("info", help="parameters, GMACs, token grids, and the paper's numbers",
                       description="Describe a model: parameters, GMACs and per-stage token grids at an input size.")
    p.add_argument("model")
    add_img_size(p)
    add_format(p)
    return p


@command("info")(_add_info)
def run_info(args) -> int:
    import torch

    from .config import DEFAULT_INPUT_SIZE, PRETRAINED
    from .flops import count_macs
    from .registry import create_model, get_config

    config = get_config(args.model)
    h, w = img_size_arg(args.img_size, DEFAULT_INPUT_SIZE[args.model])
    if min(h, w) < config.min_input_size:
        raise UsageError(f"--img-size {h} {w} is too small: CoaT needs at least {config.min_input_size} px per side")
    with torch.device("meta"):
        model = create_model(args.model)
    params = sum(p.numel() for p in model.parameters())
    grids = []
    gh, gw = h // config.patch_size, w // config.patch_size
    for i, dim in enumerate(config.embed_dims):
        if i:
            gh, gw = gh // 2, gw // 2
        grids.append({"stage": i + 1, "stride": config.patch_size * 2**i, "grid": [gh, gw], "channels": dim,
                      "serial_blocks": config.serial_depths[i]})
    entry = PRETRAINED.get(args.model)
    record = {
        "model": args.model,
        "img_size": [h, w],
        "params": params,
        "gmacs": round(count_macs(model, (h, w), config.in_chans) / 1e9, 3),
        "parallel_blocks": config.parallel_depth,
        "stages": grids,
        "paper": None if entry is None else {
            "gmacs_at_%d" % entry.input_size[1]: entry.paper_gmacs, "top1": entry.paper_top1,
            "top5": entry.paper_top5, "hub_id": entry.hub_id},
    }
    if args.format == "json":
        emit(record, "json")
        return 0
    print(f"{args.model} at {h}x{w}: {params:,} parameters, {record['gmacs']} GMACs, "
          f"{config.parallel_depth} parallel blocks")
    for g in grids:
        print(f"  stage {g['stage']}: stride {g['stride']:>2}, {g['grid'][0]}x{g['grid'][1]} tokens (+1 cls), "
              f"{g['channels']} channels, {g['serial_blocks']} serial blocks")
    if entry is not None:
        print(f"  paper: {entry.paper_gmacs} GMACs at {entry.input_size[1]}, ImageNet top-1 {entry.paper_top1} / "
              f"top-5 {entry.paper_top5} ({entry.hub_id})")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train

_TRAIN_HELP = {
    "model": "model name (`coatvit list`)",
    "compile": "torch.compile the training steps (GPU: 2.0x the eager steps for coat_lite_tiny, bf16, H100; "
               "compiling takes a minute or two first; slower on a CPU)",
    "data": "ImageFolder root with train/ and val/ (or one folder + --val-split); omit for the built-in dataset",
    "epochs": "epochs to train (recipe: 300)",
    "batch_size": "batch size per process (global = this x processes x --grad-accum)",
    "img_size": "training input size: one number (square) or H W (default: the model's, 224)",
    "lr": "learning rate; default lr-base x global batch / lr-base-size",
    "lr_base": "learning rate at the reference batch lr-base-size (recipe: 5e-4 at 512)",
    "aa": "RandAugment policy, 'none' to switch off (recipe: rand-m9-mstd0.5-inc1)",
    "reprob": "random erasing probability (recipe: 0.25; 0 switches off)",
    "mixup": "mixup alpha (recipe: 0.8; 0 switches off)",
    "cutmix": "cutmix alpha (recipe: 1.0; 0 switches off)",
    "smoothing": "label smoothing (recipe: 0.1)",
    "aug_repeats": "repeated augmentation: copies of each image per epoch (recipe: 3; 1 switches off)",
    "drop_path": "stochastic depth rate, the same in every block (recipe: 0.1)",
    "model_ema": "keep an EMA of the weights (evaluated and saved alongside)",
    "clip_grad": "clip the gradient norm to this value (0: no clipping)",
    "grad_accum": "gradient accumulation steps per optimizer update",
    "amp": "mixed precision (float16 on GPU; --amp-dtype bfloat16 also on CPU)",
    "finetune": "start from these weights (any format load_weights reads); the classifier is re-made",
    "pretrained": "start from the released ImageNet-1k weights of --model",
    "resume": "continue the run of this last.pth (its config is reused; flags override)",
    "output": "parent folder of run directories",
    "experiment": "run directory name (default: MODEL-DATE-TIME)",
    "device": "auto, cpu, cuda or cuda:N",
    "skip_nonfinite": "skip optimizer steps with a NaN/Inf loss (counted) instead of stopping",
    "no_aug": "no augmentation at all: resize and normalise only",
    "workers": "data loading processes per training process",
    "threads": "torch CPU threads per process (1 is fastest on a busy shared machine)",
    "max_steps_per_epoch": "cut every epoch to this many optimizer steps (smoke tests)",
}
_TRAIN_SHORT = {"batch_size": ["-b"], "workers": ["-j"]}


def _add_train(sub):
    import dataclasses
    import types
    import typing

    from .train import TrainConfig

    p = sub.add_parser("train", help="train or fine-tune a CoaT classifier (the authors' recipe by default)",
                       description="Train, fine-tune or resume a CoaT classifier. Defaults are the authors' ImageNet "
                                   "recipe; precedence: defaults < model recipe < resumed run < --config < flags.",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (keys as the flags, _ or -)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = _TRAIN_SHORT.get(f.name, []) + [flag]
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        base = typing.get_origin(args[0]) or args[0]
        help_text = _TRAIN_HELP.get(f.name, f.name.replace("_", " "))
        if base is bool and f.name.startswith("no_"):
            # BooleanOptionalAction would read "--no-aug" as the negation of "--aug".
            p.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        elif base is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif base is tuple:
            elem = typing.get_args(args[0])[0]
            p.add_argument(*names, dest=f.name, type=elem, nargs="+", metavar="V", help=help_text)
        else:
            p.add_argument(*names, dest=f.name, type=base, metavar=f.name.split("_")[-1].upper(), help=help_text)
    return p


@command("train")(_add_train)
def run_train(args) -> int:
    from .train import TrainConfig, resolve_config, train

    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    cfg = resolve_config(flags, getattr(args, "config", None))
    train(cfg, argv=["coatvit", *sys.argv[1:]])
    return 0


# ----------------------------------------------------------------------------------------------------------------
# eval / predict


def _add_inference_args(p: argparse.ArgumentParser, onnx: bool = False) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="PATH", help="weight file or training checkpoint (run/best.pth)")
    src.add_argument("--pretrained", action="store_true", help="the released ImageNet-1k weights of --model")
    if onnx:
        src.add_argument("--onnx", metavar="FILE", help="an ONNX file from `coatvit export` (runs in onnxruntime; "
                                                        "preprocessing and class names come from the file)")
    p.add_argument("--model", help="architecture (optional when the file names it)")
    p.add_argument("--use-ema", action="store_true", help="use the EMA weights of a training checkpoint")
    add_img_size(p)
    p.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the weights'; authors: 0.875)")
    p.add_argument("--crop-mode", choices=("center", "squash"), help="resize mode before the crop")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"), help="resize interpolation")
    p.add_argument("--mean", type=float, nargs=3, metavar="V", help="normalisation mean (R G B)")
    p.add_argument("--std", type=float, nargs=3, metavar="V", help="normalisation std (R G B)")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def _check_inference_args(args) -> None:
    """The numbers eval and predict take, checked before any file is read."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.std is not None and 0 in args.std:
        raise UsageError(f"--std divides the pixel values: give three non-zero numbers, got {args.std}")


def _load_inference(args):
    import torch

    from .evaluate import load_inference_model
    from .train import resolve_device

    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    size = img_size_arg(args.img_size, None) if args.img_size else None
    inf = load_inference_model(model_name=args.model, weights=args.weights, pretrained=args.pretrained,
                               use_ema=args.use_ema, img_size=size, crop_pct=args.crop_pct,
                               crop_mode=args.crop_mode, interpolation=args.interpolation, mean=args.mean,
                               std=args.std, device=device)
    return inf, device


def _add_eval(sub):
    p = sub.add_parser("eval", help="top-1 / top-5 / loss of weights on an ImageFolder",
                       description="Evaluate weights on an ImageFolder (DIR/<class>/<image>, or DIR/val/...). "
                                   "Preprocessing comes from the weights' metadata unless overridden.")
    p.add_argument("--data", required=True, metavar="DIR")
    _add_inference_args(p)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--per-class-csv", metavar="FILE", help="write per-class accuracy to this CSV")
    p.add_argument("--confusion-png", metavar="FILE", help="write the confusion matrix to this PNG")
    add_format(p, ("table", "json", "csv"))
    return p


@command("eval")(_add_eval)
def run_eval(args) -> int:
    from .evaluate import evaluate

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    _check_inference_args(args)
    inf, device = _load_inference(args)
    result = evaluate(inf, args.data, batch_size=args.batch_size, workers=args.workers, device=device,
                      per_class_csv=args.per_class_csv, confusion_png=args.confusion_png,
                      progress_enabled=args.format == "table")
    if result["skipped"]:
        print(f"warning: {result['skipped']} unreadable images were skipped", file=sys.stderr)
    if args.format == "csv":
        print(",".join(result))
        print(",".join(str(v).replace(",", ";") for v in result.values()))
    else:
        emit(result, args.format)
    return 0


def _add_predict(sub):
    p = sub.add_parser("predict", help="top-k classes of images",
                       description="Predict the top-k classes of image files or folders of images.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _add_inference_args(p, onnx=True)
    p.add_argument("--topk", type=int, default=5)
    add_format(p, ("table", "json", "csv"))
    return p


@command("predict")(_add_predict)
def run_predict(args) -> int:
    from .evaluate import predict

    _check_inference_args(args)
    if args.onnx:  # export.py's path: onnxruntime and the file's own metadata, no PyTorch model code
        from .export import predict_onnx

        records, skipped = predict_onnx(args.onnx, args.inputs, topk=args.topk, batch_size=args.batch_size)
    else:
        inf, device = _load_inference(args)
        records, skipped = predict(inf, args.inputs, topk=args.topk, batch_size=args.batch_size, device=device)
    if args.format == "json":
        for r in records:
            emit(r, "json")
    elif args.format == "csv":
        print("path,rank,class,index,prob")
        for r in records:
            for rank, t in enumerate(r["topk"], 1):
                print(f"{json.dumps(r['path'])},{rank},{json.dumps(t['class'])},{t['index']},{t['prob']:.6f}")
    else:
        for r in records:
            best = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["topk"])
            print(f"{r['path']}: {best}")
    if skipped:
        print(f"warning: {len(skipped)} unreadable images were skipped", file=sys.stderr)
    return 0 if records or not skipped else 2


# ----------------------------------------------------------------------------------------------------------------
# export


def _add_export(sub):
    p = sub.add_parser("export", help="ONNX / .pt2 / TFLite of a classifier or backbone, checked after export",
                       description="Export a model, then check the file against eager PyTorch (max abs diff "
                                   "printed; it must be <= 1e-4). ONNX and .pt2 have dynamic batch, height and "
                                   "width and are checked at two batch sizes and two resolutions; TFLite is batch 1 "
                                   "at the fixed --img-size, checked in the LiteRT interpreter.")
    p.add_argument("--format", dest="export_format", choices=("onnx", "pt2", "tflite"), default="onnx",
                   help="tflite runs litert-torch in its own environment ($COATVIT_LITERT_PYTHON, see README)")
    p.add_argument("--model", help="architecture (optional when the weight file names it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="PATH", help="weight file or training checkpoint")
    src.add_argument("--pretrained", action="store_true", help="the released ImageNet-1k weights of --model")
    p.add_argument("--output", required=True, metavar="FILE", help="the .onnx / .pt2 / .tflite file to write")
    p.add_argument("--features", action="store_true", help="export the backbone (four NCHW maps, strides 4-32)")
    add_img_size(p)
    p.add_argument("--no-optimize", action="store_true", help="skip the ONNX graph optimizer")
    p.add_argument("--output-format", choices=("table", "json"), default="table", help="report format")
    return p


@command("export")(_add_export)
def run_export(args) -> int:
    from .export import export_model

    size = img_size_arg(args.img_size, None) if args.img_size else None
    report = export_model(model_name=args.model, output=args.output, fmt=args.export_format, weights=args.weights,
                          pretrained=args.pretrained, features=args.features, img_size=size,
                          optimize=not args.no_optimize)
    if args.output_format == "json":
        emit(report, "json")
        return 0
    print(f"wrote {report['output']} ({report['format']}, {report['model']}"
          f"{' backbone' if report['features'] else ''}) in {report['seconds']} s")
    for c in report["checks"]:
        print(f"  batch {c['batch']}, {c['height']}x{c['width']}: "
              f"max abs diff vs eager PyTorch {c['max_abs_diff']:.3g}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# detect / segment


def _add_backbone_args(p: argparse.ArgumentParser, default_model: str = "coat_lite_tiny") -> None:
    p.add_argument("--model", default=default_model, help="CoaT variant of the backbone")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="PATH", help="backbone from a classification checkpoint (head dropped)")
    src.add_argument("--pretrained", action="store_true", help="backbone from the released ImageNet-1k weights")
    p.add_argument("--output", metavar="DIR", help="run directory")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (authors: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (authors: 0.05)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--synthetic-train", type=int, help="images of the built-in training set")
    p.add_argument("--synthetic-val", type=int, help="images of the built-in validation set")
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)


def _task_flags(args, names: dict[str, str]) -> dict[str, Any]:
    """argparse values that were given (None means: the config's default)."""
    flags = {field: getattr(args, attr) for attr, field in names.items() if getattr(args, attr, None) is not None}
    return flags


_COMMON_FLAGS = {"model": "model", "weights": "weights", "output": "output", "epochs": "epochs",
                 "max_steps": "max_steps", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
                 "warmup_steps": "warmup_steps", "synthetic_train": "synthetic_train",
                 "synthetic_val": "synthetic_val", "workers": "num_workers", "device": "device", "seed": "seed",
                 "data": "data"}


def _emit_metrics(record: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        emit(record, "json")
    else:
        emit({k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()}, "table")


def _add_detect(sub):
    p = sub.add_parser("detect", help="object detection / instance segmentation (Faster / Mask R-CNN + CoaT FPN)",
                       description="Faster R-CNN or Mask R-CNN with a CoaT + FPN backbone on COCO-format data "
                                   "(or the built-in synthetic shapes when --data is omitted).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="train a detector; the run directory gets summary.csv with bbox_ap/segm_ap")
    t.add_argument("--data", metavar="DIR", help="COCO-format folder (annotations/instances_{train,val}*.json + "
                                                 "image folders); omitted: built-in synthetic shapes")
    t.add_argument("--detector", choices=("mask_rcnn", "faster_rcnn"), default="mask_rcnn")
    _add_backbone_args(t)
    t.add_argument("--schedule", choices=("1x", "3x"), default="1x", help="12 or 36 epochs, lr x0.1 twice")
    t.add_argument("--train-sizes", type=int, nargs="+", metavar="PX", help="short sides drawn per batch "
                                                                            "(COCO default 480-800)")
    t.add_argument("--max-size", type=int, help="long-side cap (COCO default 1333)")
    t.add_argument("--test-size", type=int, help="evaluation short side (COCO default 800)")
    t.add_argument("--synthetic-size", type=int, help="side of the built-in synthetic images (default 128)")
    t.add_argument("--clip-grad", type=float, default=0.0)
    add_format(t)
    e = actions.add_parser("eval", help="COCO box / mask AP of a trained detector")
    e.add_argument("checkpoint", help="model.pth or last.pth of a detect run")
    e.add_argument("--data", metavar="DIR", help="COCO-format folder (its val split); omitted: synthetic val set")
    e.add_argument("--synthetic-val", type=int, default=64)
    e.add_argument("--synthetic-size", type=int, default=128)
    e.add_argument("--device", default="auto")
    add_format(e)
    q = actions.add_parser("predict", help="draw detections on images (PNG per image)")
    q.add_argument("checkpoint", help="model.pth or last.pth of a detect run")
    q.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="images (omitted: 4 synthetic examples)")
    q.add_argument("--output", default="predictions", metavar="DIR")
    q.add_argument("--threshold", type=float, default=0.5, help="minimum score drawn and listed")
    q.add_argument("--device", default="auto")
    add_format(q)
    return p


@command("detect")(_add_detect)
def run_detect(args) -> int:
    from . import detection

    if args.action == "train":
        flags = _task_flags(args, {**_COMMON_FLAGS, "detector": "detector", "schedule": "schedule",
                                   "train_sizes": "train_sizes", "max_size": "max_size", "test_size": "test_size",
                                   "synthetic_size": "synthetic_size", "clip_grad": "clip_grad"})
        flags.setdefault("output", "runs/detect")
        cfg = detection.DetectionConfig(pretrained=args.pretrained, **flags)
        result = detection.train_detector(cfg, argv=["coatvit", *sys.argv[1:]], show_progress=args.format == "table")
    elif args.action == "eval":
        result = detection.evaluate_checkpoint(args.checkpoint, data=args.data, synthetic_val=args.synthetic_val,
                                               synthetic_size=args.synthetic_size, device=args.device)
    else:
        inputs = args.inputs
        if not inputs:
            inputs = [str(p) for p in detection.write_synthetic_examples(f"{args.output}/inputs")]
        else:
            from .evaluate import collect_images

            inputs = [str(p) for p in collect_images(inputs)]
        for record in detection.predict_images(args.checkpoint, inputs, output=args.output,
                                               threshold=args.threshold, device=args.device):
            if args.format == "json":
                emit(record, "json")
            else:
                found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in record["detections"]) or "nothing"
                print(f"{record['image']} -> {record['png']}: {found}")
        return 0
    _emit_metrics(result, args.format)
    return 0


def _add_segment(sub):
    p = sub.add_parser("segment", help="semantic segmentation (Semantic FPN on the CoaT pyramid)",
                       description="Semantic FPN on a CoaT backbone: train / mIoU eval / colour-mask PNGs. Data: "
                                   "DIR/{train,val}/images + masks (class-index PNGs, 255 ignored), or the built-in "
                                   "synthetic shapes when --data is omitted.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="train; the run directory gets summary.csv with miou")
    t.add_argument("--data", metavar="DIR", help="folder with train/ and val/ (images/ + masks/)")
    t.add_argument("--num-classes", type=int, help="classes including the background (required with --data)")
    t.add_argument("--size", type=int, help="training crop / evaluation short side (default 128)")
    _add_backbone_args(t)
    add_format(t)
    e = actions.add_parser("eval", help="mIoU of a trained segmenter")
    e.add_argument("checkpoint", help="model.pth or last.pth of a segment run")
    e.add_argument("--data", metavar="DIR", help="folder with val/images and val/masks; omitted: synthetic val")
    e.add_argument("--synthetic-val", type=int, default=64)
    e.add_argument("--device", default="auto")
    add_format(e)
    q = actions.add_parser("predict", help="colour-mask and overlay PNGs of images")
    q.add_argument("checkpoint", help="model.pth or last.pth of a segment run")
    q.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="images (omitted: 4 synthetic examples)")
    q.add_argument("--output", default="predictions", metavar="DIR")
    q.add_argument("--device", default="auto")
    add_format(q)
    return p


@command("segment")(_add_segment)
def run_segment(args) -> int:
    from . import segmentation

    if args.action == "train":
        flags = _task_flags(args, {**_COMMON_FLAGS, "num_classes": "num_classes", "size": "size"})
        flags.setdefault("output", "runs/segment")
        cfg = segmentation.SegmentationConfig(pretrained=args.pretrained, **flags)
        result = segmentation.train_segmenter(cfg, argv=["coatvit", *sys.argv[1:]],
                                              show_progress=args.format == "table")
    elif args.action == "eval":
        result = segmentation.evaluate_checkpoint(args.checkpoint, data=args.data, synthetic_val=args.synthetic_val,
                                                  device=args.device)
    else:
        from .detection import write_synthetic_examples
        from .evaluate import collect_images

        inputs = [str(p) for p in collect_images(args.inputs)] if args.inputs else \
            [str(p) for p in write_synthetic_examples(f"{args.output}/inputs")]
        for record in segmentation.predict_masks(args.checkpoint, inputs, output=args.output, device=args.device):
            if args.format == "json":
                emit(record, "json")
            else:
                shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in record["classes"].items())
                print(f"{record['image']} -> {record['mask_png']}: {shares}")
        return 0
    _emit_metrics(result, args.format)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# benchmark


def _add_benchmark(sub):
    p = sub.add_parser(
        "benchmark", help="throughput, latency, training step and memory against timm",
        description="Time our model against baselines (timm's model of the same name, timm + torch.compile, our "
                    "reference path), interleaved in one process; prints medians, spreads and speedups.")
    p.add_argument("--model", default="coat_lite_tiny")
    p.add_argument("--batch-size", type=int, default=16)
    add_img_size(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (auto: cuda where visible)")
    p.add_argument("--amp", choices=("none", "bfloat16", "float16"), default="none", help="autocast dtype")
    p.add_argument("--channels-last", action="store_true", help="channels-last model and input")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune",
                                                                  "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of every compiled contender alike")
    p.add_argument("--freeze", action="store_true",
                   help="compile inference with inductor's freezing, every compiled contender alike (weights become "
                        "graph constants, pre-packed on a CPU: for deployment)")
    p.add_argument("--vs", nargs="*", default=["timm"], metavar="BASELINE",
                   help="baselines: timm, timm-compile, reference, ours-compile, ours-ckpt (with gradient "
                        "checkpointing), ours-triton / ours-no-triton (Triton kernels forced on / off, "
                        "CUDA), ours-no-native (without the native CPU kernels), ours-no-onednn (linear layers "
                        "through PyTorch's kernels, not oneDNN's); none: ours alone")
    p.add_argument("--modes", nargs="+", default=["infer", "latency", "train"], metavar="MODE",
                   help="infer (batch), latency (batch 1), train (fwd + bwd + AdamW)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median and min-max reported)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (torch.compile compiles here)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--tuned-allocator", action="store_true",
                   help="keep freed memory for reuse (coatvit.runtime.tune_cpu_allocator, as the other commands do; "
                        "process-wide, so the baselines get it too); default: the allocator as Python has it")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the n^3 matmul that measures the peak, in the --amp dtype (default 2048 CPU, 8192 GPU)")
    p.add_argument("--csv", default=None, help="append the rows to this CSV (timm's benchmark column names)")
    add_format(p)
    return p


@command("benchmark")(_add_benchmark)
def run_benchmark(args) -> int:
    from .benchmark import BenchmarkConfig, run_benchmark, write_csv
    from .config import DEFAULT_INPUT_SIZE
    from .registry import get_config
    from .train import parse_device

    device = parse_device(args.device)  # one line for an unknown name or a device this machine lacks
    if args.device == "auto":
        args.device = device.type

    config = get_config(args.model)
    img_size = img_size_arg(args.img_size, DEFAULT_INPUT_SIZE[args.model])
    if min(img_size) < config.min_input_size:
        raise UsageError(f"--img-size {img_size[0]} {img_size[1]} is too small: CoaT needs at least "
                         f"{config.min_input_size} px per side")
    cfg = BenchmarkConfig(
        model=args.model, batch_size=args.batch_size, img_size=img_size, device=args.device, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode, freeze=args.freeze,
        vs=tuple(args.vs), modes=tuple(args.modes), repeats=args.repeats, steps=args.steps, warmup=args.warmup,
        threads=args.threads,
        peak_memory=not args.no_memory, matmul_size=args.matmul_size, tuned_allocator=args.tuned_allocator)
    log = (lambda s: None) if args.format == "json" else (lambda s: print(s, flush=True))
    rows = run_benchmark(cfg, log=log)
    if args.csv:
        write_csv(rows, args.csv)
    if args.format == "json":
        for row in rows:
            emit(row, "json")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatvit", description="CoaT image transformers: models, training, export.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_parser, _) in COMMANDS.items():
        p = add_parser(sub)
        p.set_defaults(_command=name)
    return parser


# Commands that run models call coatvit.runtime.tune_cpu_allocator() first (COATVIT_TUNE_ALLOCATOR=0 opts out);
# `benchmark` decides for itself (--tuned-allocator), `list` and `info` run no model.
TUNED_ALLOCATOR_COMMANDS = ("train", "eval", "predict", "export", "detect", "segment")


def main(argv: list[str] | None = None) -> int:
    from .errors import CoaTError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in argv
    if args._command in TUNED_ALLOCATOR_COMMANDS:
        from .runtime import tune_cpu_allocator_from_env

        tune_cpu_allocator_from_env()
    try:
        return COMMANDS[args._command][1](args) or 0
    except (CoaTError, UsageError, ValueError, FileNotFoundError, PermissionError) as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"coatvit {args._command}: error: {msg}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        msg = None if debug else _runtime_failure(e, args)
        if msg is None:
            raise
        print(f"coatvit {args._command}: error: {msg}", file=sys.stderr)
        if _lost_peer(e):
            atexit.register(_exit_without_teardown, 2)
        return 2
    except KeyboardInterrupt:
        print(f"coatvit {args._command}: interrupted", file=sys.stderr)
        return 130


def _exit_without_teardown(code: int) -> None:
    """Ends the process with `code` at interpreter exit, before the process group is torn down.

    After a peer died or hung, the group's C++ threads can still be waiting on it; destroying them at shutdown
    sometimes aborts the process ("terminate called without an active exception", exit status -6 instead of 2).
    Registered with atexit once the error is printed; flushes the logs and the standard streams first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to save
            pass
    os._exit(code)


_DIST_FAILURE = re.compile(r"connection (reset|closed|refused)|broken pipe|timed? ?out|gloo|nccl|socket", re.I)


def _lost_peer(e: BaseException) -> bool:
    """Whether e is a distributed run losing one of its processes (a collective failed or timed out)."""
    dist = sys.modules.get("torch.distributed")
    return (isinstance(e, RuntimeError) and dist is not None and dist.is_available() and dist.is_initialized()
            and (isinstance(e, getattr(dist, "DistError", ())) or bool(_DIST_FAILURE.search(str(e)))))


def _runtime_failure(e: BaseException, args: argparse.Namespace) -> str | None:
    """One line for failures no library function can name in advance (memory, disk, a dead peer), else None."""
    first = " ".join(str(e).split())[:160] or type(e).__name__
    if type(e).__name__ == "OutOfMemoryError":
        batch = getattr(args, "batch_size", None)
        at = f" at batch size {batch} per process" if batch else ""
        return f"out of memory{at} ({first}); lower -b/--batch-size (and raise --grad-accum to keep the global batch)"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
        where = f" writing {e.filename}" if e.filename else ""
        return (f"{e.strerror or first}{where}; files are written atomically, so the previous checkpoint is intact: "
                f"free space or pick another --output, then --resume")
    if _lost_peer(e):
        rank = sys.modules["torch.distributed"].get_rank()
        return (f"rank {rank} lost contact with the other processes of the distributed run ({first}); another rank "
                f"probably died or hung (see its log). Restart all ranks with --resume RUN_DIR/last.pth")
    return None
