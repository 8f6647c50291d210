"""The `coatvit` command: argparse subcommands, each a thin call into a library module.

Known errors (`CoaTError` and friends) become one line on stderr and exit code 2; `--debug` shows the traceback.
Every subcommand registers itself in `COMMANDS` through `add_<name>_parser`; nothing below imports this module.
"""

from __future__ import annotations

import argparse
import json
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
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatvit", description="CoaT image transformers: models, training, export.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_parser, _) in COMMANDS.items():
        p = add_parser(sub)
        p.set_defaults(_command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import CoaTError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in argv
    try:
        return COMMANDS[args._command][1](args) or 0
    except (CoaTError, UsageError, ValueError, FileNotFoundError, PermissionError) as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"coatvit {args._command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coatvit {args._command}: interrupted", file=sys.stderr)
        return 130
