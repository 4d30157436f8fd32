"""Command-line pieces every scenario shares: argument types, and the timing
of a run (``--duration``, ``--warmup``, ``--runs``, and ``--quick``)."""

from __future__ import annotations

import argparse

DURATION_DEFAULT_S = 10.0  # measured, per run (or phase) and server
WARMUP_DEFAULT_S = 2.0  # loaded but not measured, before each measurement
RUNS_DEFAULT = 3  # per server, alternating
# --quick: one short run of each.
QUICK_DURATION_S = 3.0
QUICK_WARMUP_S = 1.0
QUICK_RUNS = 1


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def resolve_timing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--duration``, ``--warmup`` and ``--runs`` not given: their ``--quick``
    values with ``args.quick``, else the defaults (flags given explicitly win)."""
    quick = args.quick
    if args.duration is None:
        args.duration = QUICK_DURATION_S if quick else DURATION_DEFAULT_S
    if args.warmup is None:
        args.warmup = QUICK_WARMUP_S if quick else WARMUP_DEFAULT_S
    if args.runs is None:
        args.runs = QUICK_RUNS if quick else RUNS_DEFAULT
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
