"""Shared by the benchmarks that compare two ways of running one layer: the PyTorch runtime
module loaded from the source tree, interleaved timing, and the table columns."""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RUNTIME_PATH = Path(__file__).resolve().parents[1] / "backends" / "pytorch" / "runtime.py"


def load_runtime():
    """``backends/pytorch/runtime.py`` imported as ``moec_runtime`` (the name generated code uses),
    after its sibling ``cpu_fused.py`` as ``moec_cpu_fused``."""
    for name, file in (("moec_cpu_fused", "cpu_fused.py"), ("moec_runtime", "runtime.py")):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, RUNTIME_PATH.with_name(file))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    return sys.modules["moec_runtime"]


def parse_args(argv, description: str, full_reps: int) -> tuple[bool, int]:
    """The common command line (``--quick``, ``--threads``, ``--reps``); sets torch's thread count
    and returns (quick, reps)."""
    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small shapes, finishes in seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args.quick, args.reps or (3 if args.quick else full_reps)


def shape_columns(shape: tuple, widths: tuple) -> str:
    """A shape's values, right-aligned in columns of the given widths."""
    return " ".join(f"{v:>{w}}" for v, w in zip(shape, widths))


def interleaved_medians(variants: dict[str, Callable[[], None]], runs: dict[str, Callable[[], None]],
                        reps: int) -> dict[tuple[str, str], float]:
    """Median ms of every (variant, run). ``variants``: name -> a function that makes this variant
    the one the runs use; ``runs``: kind (e.g. "fwd", "f+b") -> the timed call. Each round takes
    the variants in a new (seeded) random order and runs each kind three times in a row, timing
    the last two: the first call after the other variant re-warms caches and the allocator."""
    samples = {(name, kind): [] for name in variants for kind in runs}
    order, shuffle = list(variants), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            variants[name]()
            for kind, run in runs.items():
                for i in range(3):
                    start = time.perf_counter()
                    run()
                    if i:
                        samples[(name, kind)].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(v) for key, v in samples.items()}


def ab_header(a: str, b: str) -> str:
    """Column titles for `ab_columns`."""
    w_a, w_b = max(len(a) + 4, 8), max(len(b) + 4, 8)
    return (f"{a + ' fwd':>{w_a}} {b + ' fwd':>{w_b}} {'speedup':>7} | "
            f"{a + ' f+b':>{w_a}} {b + ' f+b':>{w_b}} {'speedup':>7}")


def ab_columns(ms: dict, a: str, b: str) -> str:
    """fwd and f+b of variants a and b and how much faster a is (b / a), under `ab_header`."""
    w_a, w_b = max(len(a) + 4, 8), max(len(b) + 4, 8)
    cols = []
    for kind in ("fwd", "f+b"):
        t_a, t_b = ms[(a, kind)], ms[(b, kind)]
        cols.append(f"{t_a:>{w_a}.2f} {t_b:>{w_b}.2f} {t_b / t_a:>6.2f}x")
    return " | ".join(cols)
