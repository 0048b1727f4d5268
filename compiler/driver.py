"""The compiler pipeline: source -> AST -> checked spec -> IR -> passes. No printing here."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from moec.build import build_graph
from moec.diagnostics import CompileError, Diagnostics, did_you_mean
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


def parse_pass(spec: str) -> tuple[str, dict]:
    """`fuse-permute{block-m=64}` -> ("fuse-permute", {"block_m": 64}); raises CompileError."""
    import re

    match = re.fullmatch(r"([a-z][a-z0-9-]*)(?:\{(.*)\})?", spec.strip())
    name = match.group(1) if match else spec
    if match is None or name not in REGISTRY:
        _fail("E0402", f"unknown pass `{spec}`", did_you_mean(name, REGISTRY) or f"passes: {', '.join(REGISTRY)}")
    options: dict = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            _fail("E0402", f"pass option `{item}` needs a value", f"write {name}{{{item.strip()}=...}}")
        value = value.strip()
        options[key.strip().replace("-", "_")] = int(value) if value.lstrip("-").isdigit() else value
    params = inspect.signature(REGISTRY[name].__init__).parameters
    for key in options:
        if key not in params:
            known = [p.replace("_", "-") for p in params if p != "self"]
            _fail("E0402", f"pass `{name}` has no option `{key.replace('_', '-')}`",
                  f"options: {', '.join(known)}" if known else "this pass takes no options")
    return name, options


def _fail(code: str, message: str, hint: str | None = None):
    diags = Diagnostics()
    diags.error(code, message, None, hint)
    raise CompileError(diags)


def compile_model(path: str, pipeline: str = "default", stop_after: str | None = None,
                  text: str | None = None) -> Compilation:
    """Run the front end and a pass pipeline; raise CompileError with every diagnostic on failure.

    `stop_after` names a pass, optionally with options (`fuse-permute{block-m=64}`); the pipeline
    stops after it (it is appended when the pipeline does not contain it)."""
    stop_name, stop_options = parse_pass(stop_after) if stop_after is not None else (None, {})
    spec = frontend(path, text)
    names = list(PIPELINES[pipeline])
    if stop_name is not None and stop_name not in names:
        names.append(stop_name)
    try:
        passes = [REGISTRY[n](**(stop_options if n == stop_name else {})) for n in names]
    except (TypeError, ValueError) as exc:
        _fail("E0402", f"bad option for pass `{stop_name}`: {exc}")
    graph = build_graph(spec)
    verify(graph)
    try:
        ctx = run_pipeline(graph, passes, stop_after=stop_name, verify=verify)
    except PassFailed as exc:
        raise RuntimeError(str(exc)) from exc
    return Compilation(spec=spec, graph=graph, results=ctx.results)
