"""The compiler pipeline: source -> AST -> checked spec -> IR -> passes. No printing here."""

from __future__ import annotations

import contextlib
import inspect
import re
import types
import typing
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
    """Parse and check one file (and its imports); return all diagnostics.

    A file of top-level definitions without a model (a file to `import`) checks without error
    unless `require_model`; a file that holds nothing at all (empty, or only comments) gets the
    "defines no model" error `moec compile` and `moec report` give it."""
    diags = Diagnostics()
    program = load_program(path, diags)
    if not diags.has_errors:
        root = program.root
        empty = root is not None and not (root.models or root.definitions or root.imports)
        elaborate(program, diags, require_model=require_model or empty)
    return diags


def frontend(path: str, text: str | None = None) -> ModelSpec:
    diags = Diagnostics()
    program = load_program(path, diags, text)
    spec = elaborate(program, diags) if not diags.has_errors else None
    if diags.has_errors or spec is None:
        raise CompileError(diags)
    return spec


# Integer pass options outside these ranges are refused when parsed (`--after 'pass{opt=...}'`);
# any other integer option must fit in 64 bits.
OPTION_RANGES: dict[tuple[str, str], tuple[int, int]] = {
    # rows per block of the grouped expert GEMM: every expert's segment pads to a multiple of it
    # (worst case E * (block_m - 1) extra rows); GEMM tiles are at most a few hundred rows
    ("fuse-permute", "block_m"): (1, 4096),
    ("place-experts", "devices"): (1, 2**31 - 1),
    ("place-experts", "redundant"): (0, 2**31 - 1),
    ("place-experts", "bytes_per_param"): (1, 16),  # fp8 .. fp128
}
_INT64 = (-(2**63), 2**63 - 1)


def _option_types(cls: type) -> dict[str, tuple]:
    """Option name -> the types its annotation admits (empty when not annotated)."""
    hints: dict = {}
    for source in (cls, cls.__init__):
        # an annotation that does not resolve leaves its option unchecked here (the pass checks it)
        with contextlib.suppress(NameError, TypeError, AttributeError):
            hints.update(typing.get_type_hints(source))
    admitted = {}
    for key, hint in hints.items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        admitted[key] = tuple(typing.get_origin(a) or a for a in (typing.get_args(hint) if union else (hint,)))
    return admitted


def _option_value(name: str, key: str, text: str, admitted: tuple):
    """The value of pass option `key` written as `text`, converted to the type its pass declares."""
    shown = key.replace("_", "-")
    low, high = OPTION_RANGES.get((name, key), _INT64)
    hint = f"write {name}{{{shown}=N}} with N an integer in [{low}, {high}]"
    if re.fullmatch(r"[+-]?[0-9]+", text) and (int in admitted or not admitted):
        value = int(text)
        if value < low:
            least = {0: "non-negative", 1: "positive"}.get(low, f"at least {low}")
            _fail("E0402", f"bad option for pass `{name}`: {shown} must be {least}, got {text}", hint)
        if value > high:
            _fail("E0402", f"bad option for pass `{name}`: {shown} must be at most {high}, got {text}", hint)
        return value
    if str in admitted or not admitted:
        return text
    if float in admitted:
        try:
            return float(text)
        except ValueError:
            pass
    wanted = "an integer" if int in admitted else " or ".join(t.__name__ for t in admitted if t is not type(None))
    _fail("E0402", f"bad option for pass `{name}`: {shown} must be {wanted}, got `{text}`",
          hint if int in admitted else None)


def parse_pass(spec: str) -> tuple[str, dict]:
    """`fuse-permute{block-m=64}` -> ("fuse-permute", {"block_m": 64}); raises CompileError.

    Each option is converted to the type its pass declares (an integer option takes only an
    integer, within `OPTION_RANGES`)."""
    match = re.fullmatch(r"([a-z][a-z0-9-]*)(?:\{(.*)\})?", spec.strip())
    name = match.group(1) if match else spec
    if match is None or name not in REGISTRY:
        _fail("E0402", f"unknown pass `{spec}`", did_you_mean(name, REGISTRY) or f"passes: {', '.join(REGISTRY)}")
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p.name for p in list(inspect.signature(REGISTRY[name].__init__).parameters.values())[1:]
              if p.kind in named]  # after `self`; a pass without __init__ takes no options
    admitted = _option_types(REGISTRY[name])
    options: dict = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            _fail("E0402", f"pass option `{item}` needs a value", f"write {name}{{{item.strip()}=...}}")
        key, value = key.strip().replace("-", "_"), value.strip()
        if key not in params:
            known = [p.replace("_", "-") for p in params]
            _fail("E0402", f"pass `{name}` has no option `{key.replace('_', '-')}`",
                  f"options: {', '.join(known)}" if known else "this pass takes no options")
        if not value:
            _fail("E0402", f"pass option `{key.replace('_', '-')}` needs a value",
                  f"write {name}{{{key.replace('_', '-')}=...}}")
        options[key] = _option_value(name, key, value, admitted.get(key, ()))
    return name, options


def task_count(graph: Graph) -> int | None:
    """How many task ids a model takes: the fewest experts of any layer routed by task (task ids
    index those experts); None when no layer routes by task (the model takes no task ids)."""
    counts = []
    for node in graph.nodes():
        op = graph.op(node)
        if op.kind in ("route", "router") and op.router.by == "task":
            counts.append(op.num_experts)
        elif op.kind == "moe":  # before lower-moe
            counts += [g.routed_experts for g in op.groups if g.router.by == "task"]
    return min(counts) if counts else None


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
        if exc.pass_name == stop_name and stop_options and isinstance(exc.cause, (ValueError, OSError)):
            # a pass the user configured refused its options (e.g. a placement profile it cannot read)
            _fail("E0402", f"pass `{stop_name}`: {exc.cause}")
        raise RuntimeError(str(exc)) from exc
    return Compilation(spec=spec, graph=graph, results=ctx.results)
