"""Triton backend: fused router, token alignment and grouped expert GEMM kernels (forward and
backward) generated per model, plus a module with the PyTorch backend's contract calling them."""

from __future__ import annotations

import os

from moec.backends import BackendError, write_tree

from .codegen import render, runtime_files

__all__ = ["emit", "render"]


def emit(comp, out_dir: str, static: bool = False, plan: dict | None = None, **options) -> list[str]:
    """Write `<model>.py`, `<model>_kernels.py` and the runtime modules they import into `out_dir`."""
    if static:
        raise BackendError("the triton target has no static-shape form (use --target pytorch --static)")
    if plan is not None:
        raise BackendError("the triton target has no expert-parallel form yet (use --target pytorch --plan)")
    source = os.path.relpath(comp.spec.path) if os.path.exists(comp.spec.path) else comp.spec.path
    files = {**render(comp.graph, source, comp.spec.targets), **runtime_files()}
    return write_tree(out_dir, files)
