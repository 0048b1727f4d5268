"""Triton backend: fused router, token alignment and grouped expert GEMM kernels (forward and
backward) generated per model, plus a module with the PyTorch backend's contract calling them."""

from __future__ import annotations

import os

from moec.backends import write_tree

from .codegen import render, runtime_files

__all__ = ["emit", "render"]


def emit(comp, out_dir: str, **options) -> list[str]:
    """Write `<model>.py`, `<model>_kernels.py` and the runtime modules they import into `out_dir`."""
    source = os.path.relpath(comp.spec.path) if os.path.exists(comp.spec.path) else comp.spec.path
    files = {**render(comp.graph, source, comp.spec.targets), **runtime_files()}
    return write_tree(out_dir, files)
