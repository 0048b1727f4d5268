"""PyTorch backend: generated, readable nn.Module source plus its runtime module."""

from __future__ import annotations

import os

from moec.backends import write_tree

from .codegen import module_name, py_name, render, runtime_files

__all__ = ["emit", "module_name", "py_name", "render"]


def emit(comp, out_dir: str, static: bool = False, plan: dict | None = None, **options) -> list[str]:
    """Write `<model>.py` and the runtime modules it imports into `out_dir`; return the paths."""
    source = os.path.relpath(comp.spec.path) if os.path.exists(comp.spec.path) else comp.spec.path
    module = module_name(comp.graph.name)
    files = {f"{module}.py": render(comp.graph, source, static=static, plan=plan), **runtime_files()}
    return write_tree(out_dir, files)
