"""HLS target: an FPGA-oriented, hls4ml-like Vitis HLS C++ project for a moec model.

``emit(comp, out_dir, seed=0)`` writes the project (see templates/README.md.j2 for its files)
with the weights of ``moec.load(path, seed=seed)``; ``csim(path, ...)`` builds it with g++
against the ap_types headers, runs it through ctypes and compares it with PyTorch;
``report(comp)`` estimates DSPs, on-chip memory and cycles per token.

Pipeline: IR graph (after the default passes) -> model.build_project (view-model) ->
weights.export (PyTorch state_dict -> project layouts) -> emit.render (jinja2 templates) ->
moec.backends.write_tree.
"""

from __future__ import annotations

import os

from .estimate import estimate, format_estimate
from .model import Project, build_project
from .precision import Fixed, HlsConfig

__all__ = ["Fixed", "HlsConfig", "Project", "csim", "emit", "estimate", "format_estimate", "project_for",
           "report"]


def project_for(comp) -> Project:
    """The view-model of a Compilation, with the knobs of its `target hls` section."""
    config = HlsConfig.from_settings(comp.spec.targets.get("hls"))
    # the file name appears in comments of C++, tcl and Markdown: printable, no line splicing
    source = "".join(c if c.isprintable() and c not in "\\`" else "_" for c in os.path.basename(comp.spec.path))
    return build_project(comp.graph, config, source=source)


def files_for(comp, seed: int = 0, state_dict: dict | None = None, model=None) -> tuple[Project, dict[str, str]]:
    """(project, relative path -> text) for a Compilation; weights from `state_dict`, or from `model`,
    or from ``moec.load(path, seed=seed)``."""
    from . import render as R
    from . import sample as S
    from .weights import export

    project = project_for(comp)
    if model is None:
        import moec

        model = moec.load(comp.spec.path, seed=seed)
    state = state_dict if state_dict is not None else model.state_dict()
    weights = export(project, state)
    example = S.example_inputs(project, comp, tokens=min(8, project.config.max_tokens), seed=seed)
    example["expected"] = S.reference(model, example) if state_dict is None else None
    return project, R.render(project, weights, example)


def emit(comp, out_dir: str, seed: int = 0, state_dict: dict | None = None, **_options) -> list[str]:
    """Registry entry: write the HLS project of `comp` into `out_dir` (completely or not at all)."""
    from moec.backends import write_tree

    _, files = files_for(comp, seed=seed, state_dict=state_dict)
    written = write_tree(out_dir, files)
    os.chmod(os.path.join(out_dir, "build_lib.sh"), 0o755)
    return written


def report(comp) -> str:
    return format_estimate(estimate(project_for(comp)))


def csim(path: str, **kwargs):
    """C-simulate the model of `path` and compare with PyTorch; see csim.run."""
    from .simulate import run

    return run(path, **kwargs)
