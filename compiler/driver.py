"""The compiler pipeline: source -> AST -> checked spec -> IR -> passes. No printing here."""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.build import build_graph
from moec.diagnostics import CompileError, Diagnostics
from moec.dsl.elaborate import ModelSpec, elaborate
from moec.dsl.loader import load_program
from moec.ir import Graph
from moec.passes import PIPELINES, REGISTRY, PassFailed, run_pipeline
from moec.verify import verify


@dataclass
class Compilation:
    spec: ModelSpec
    graph: Graph
    results: dict = field(default_factory=dict)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)


def check(path: str, require_model: bool = False) -> Diagnostics:
    """Parse and check one file (and its imports); return all diagnostics."""
    diags = Diagnostics()
    program = load_program(path, diags)
    if not diags.has_errors:
        elaborate(program, diags, require_model=require_model)
    return diags


def frontend(path: str, text: str | None = None) -> ModelSpec:
    diags = Diagnostics()
    program = load_program(path, diags, text)
    spec = elaborate(program, diags) if not diags.has_errors else None
    if diags.has_errors or spec is None:
        raise CompileError(diags)
    return spec


def compile_model(path: str, pipeline: str = "default", stop_after: str | None = None,
                  text: str | None = None) -> Compilation:
    """Run the front end and a pass pipeline; raise CompileError with every diagnostic on failure."""
    spec = frontend(path, text)
    if stop_after is not None and stop_after not in REGISTRY:
        diags = Diagnostics()
        from moec.diagnostics import did_you_mean

        diags.error("E0402", f"unknown pass `{stop_after}`", None,
                    did_you_mean(stop_after, REGISTRY) or f"passes: {', '.join(REGISTRY)}")
        raise CompileError(diags)
    names = list(PIPELINES[pipeline])
    if stop_after is not None and stop_after not in names:
        names.append(stop_after)
    graph = build_graph(spec)
    verify(graph)
    try:
        ctx = run_pipeline(graph, [REGISTRY[n]() for n in names], stop_after=stop_after, verify=verify)
    except PassFailed as exc:
        raise RuntimeError(str(exc)) from exc
    return Compilation(spec=spec, graph=graph, results=ctx.results)
