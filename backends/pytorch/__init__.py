"""PyTorch backend: generated, readable nn.Module source plus its runtime module."""

from __future__ import annotations

import os

from moec.backends import write_tree

from .codegen import py_name, render, runtime_source, static_runtime_source

__all__ = ["emit", "py_name", "render"]


def emit(comp, out_dir: str, static: bool = False, **options) -> list[str]:
    """Write `<model>.py` and `moec_runtime.py` (+ `moec_static_runtime.py` with `static`) into
    `out_dir`; return the relative paths."""
    source = os.path.relpath(comp.spec.path) if os.path.exists(comp.spec.path) else comp.spec.path
    module = py_name(comp.graph.name)
    files = {f"{module}.py": render(comp.graph, source, static=static), "moec_runtime.py": runtime_source()}
    if static:
        files["moec_static_runtime.py"] = static_runtime_source()
    return write_tree(out_dir, files)
