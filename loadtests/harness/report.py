"""Tables and JSON of a benchmark, and the run driver that ends in them."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

from loadtests.harness.processes import Bench, sigterm_as_exit


def median_range(values: list[float], fmt: str) -> str:
    """A table cell: the median, and the min-max spread when there are several."""
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


def clean_json(value: Any) -> Any:
    """JSON has no NaN or infinity: a figure that could not be measured is null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def machine_summary() -> dict[str, Any]:
    """The machine a figure was measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_bench(
    args: argparse.Namespace,
    bench: Bench,
    measure: Callable[[Any], list[dict[str, Any]]],
    render: Callable[[argparse.Namespace, list[dict[str, Any]]], str],
    report: Callable[[argparse.Namespace, list[dict[str, Any]]], dict[str, Any]],
) -> int:
    """Measure, clean up whatever happens, print the table, write the JSON.

    The exit code: 0, or 130 when interrupted (Ctrl-C or SIGTERM)."""
    with sigterm_as_exit():
        failed = False  # keep the server logs only when something broke
        try:
            rows = measure(bench)
        except (KeyboardInterrupt, SystemExit):
            print("interrupted; cleaning up", file=sys.stderr)
            return 130
        except BaseException:
            failed = True
            raise
        finally:
            bench.close(keep_logs=failed)
    print(render(args, rows))
    if args.json is not None:
        args.json.write_text(json.dumps(report(args, rows), indent=2) + "\n")
    return 0
