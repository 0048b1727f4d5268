"""AST -> a checked, fully evaluated model description (`ModelSpec`).

Evaluates constants, instantiates parametric experts and blocks, expands the layer stack, and
runs every semantic check. All errors are collected in the Diagnostics; nothing is raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moec import ops as O
from moec.diagnostics import Diagnostics, SourceLoc, did_you_mean

from . import ast
from . import kinds as K
from .loader import Program

MAX_LAYERS = 100_000
MAX_DEF_DEPTH = 32
MAX_EXPERTS = 1 << 20  # experts per pool: far above any published model, low enough to analyse quickly
MAX_ITERATIONS = 64  # chain-of-experts iterations per moe (each one is a router and an expert pass)


class _Bad:
    """The value of an expression that already produced an error (suppresses cascades)."""

    def __repr__(self) -> str:
        return "<error>"


BAD = _Bad()


@dataclass(frozen=True)
class Symbol:
    """A bare name used as an enumeration value, e.g. `act = silu`."""

    name: str


@dataclass
class Sublayer:
    norm: O.NormOp | None
    op: O.AttentionOp | O.FFNOp | O.MoEOp


@dataclass
class BlockSpec:
    key: str  # unique per (block, arguments): one generated class each
    name: str
    residual: str
    sublayers: list[Sublayer]
    loc: SourceLoc
    depth: O.DepthSpec | None = None  # Mixture-of-Depths: only the kept tokens go through the block


@dataclass
class ModelSpec:
    name: str
    path: str
    dim: int
    modalities: tuple[str, ...]
    input_modalities: tuple[str, ...]
    layers: list[BlockSpec]
    final_norm: O.NormOp | None
    targets: dict[str, dict] = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    loc: SourceLoc | None = None


@dataclass
class Scope:
    consts: dict[str, object] = field(default_factory=dict)
    const_defs: dict[str, ast.ConstDef] = field(default_factory=dict)
    experts: dict[str, tuple[ast.ExpertDef, Scope]] = field(default_factory=dict)
    blocks: dict[str, tuple[ast.BlockDef, Scope]] = field(default_factory=dict)
    parent: Scope | None = None

    def lookup(self, table: str, name: str):
        scope = self
        while scope is not None:
            found = getattr(scope, table).get(name)
            if found is not None:
                return found
            scope = scope.parent
        return None

    def names(self, table: str) -> set[str]:
        out, scope = set(), self
        while scope is not None:
            out |= set(getattr(scope, table))
            scope = scope.parent
        return out

    def child(self, consts: dict) -> Scope:
        return Scope(consts=dict(consts), parent=self)


def _loc_str(loc: SourceLoc | None) -> str:
    return f"{loc.path}:{loc.line}:{loc.col}" if loc else "?"


SHARED_POOL = "shared_pool"  # the group name of routed experts beside modality groups (MoIIE's inter-modality pool)


class Elaborator:
    def __init__(self, diags: Diagnostics):
        self.d = diags
        self.global_scope = Scope()
        self._block_cache: dict[tuple, BlockSpec | None] = {}
        self._def_depth = 0
        self.dim = 0
        self.modalities: tuple[str, ...] = ()
        self.input_modalities: tuple[str, ...] = ()

    # ---- definitions ----------------------------------------------------------------------
    def declare(self, scope: Scope, item) -> None:
        if isinstance(item, ast.ConstDef):
            self._check_dup(scope, item.name, "const_defs", "constant")
            scope.const_defs[item.name.name] = item
            try:
                scope.consts[item.name.name] = self.eval(item.value, scope)
            except RecursionError:
                self.d.error("E0104", "expression nested too deeply", item.loc, "split it into several constants")
                scope.consts[item.name.name] = BAD
        elif isinstance(item, ast.ExpertDef):
            self._check_reserved(item.name, "expert")
            self._check_params(item.params)
            self._check_dup(scope, item.name, "experts", "expert")
            scope.experts[item.name.name] = (item, scope)
        elif isinstance(item, ast.BlockDef):
            self._check_reserved(item.name, "block")
            self._check_params(item.params)
            self._check_dup(scope, item.name, "blocks", "block")
            scope.blocks[item.name.name] = (item, scope)

    def _check_reserved(self, name: ast.Name, what: str) -> None:
        if name.name in K.BUILTIN_NAMES:
            self.d.error("E0213", f"`{name.name}` names a built-in kind; a user {what} cannot take it", name.loc,
                         f"choose another name, e.g. `my_{name.name}`")

    def _check_params(self, params: list[ast.Name]) -> None:
        seen: set[str] = set()
        for p in params:
            if p.name in seen:
                self.d.error("E0203", f"parameter `{p.name}` is listed twice", p.loc,
                             "give each parameter of the definition its own name")
            seen.add(p.name)

    def _check_dup(self, scope: Scope, name: ast.Name, table: str, what: str) -> None:
        prev = scope.lookup(table, name.name)
        if prev is not None:
            prev_loc = prev[0].name.loc if isinstance(prev, tuple) else prev.name.loc
            self.d.error("E0203", f"{what} `{name.name}` is already defined", name.loc,
                         f"first defined at {_loc_str(prev_loc)}")

    # ---- expressions ----------------------------------------------------------------------
    def eval(self, e: ast.Expr, scope: Scope, symbols: bool = False):
        if isinstance(e, ast.Number) and isinstance(e.value, float) and not math.isfinite(e.value):
            self.d.error("E0212", "number too large", e.loc, "numbers must fit a 64-bit float (below about 1.8e308)")
            return BAD
        if isinstance(e, ast.Number | ast.Bool):
            return e.value
        if isinstance(e, ast.String):
            return e.value
        if isinstance(e, ast.Ref):
            value = scope.lookup("consts", e.name)
            if value is not None:
                return value
            if symbols:
                return Symbol(e.name)
            self.d.error("E0201", f"`{e.name}` is not defined", e.loc, did_you_mean(e.name, scope.names("consts"))
                         or f"define it before its use, e.g. `const {e.name} = 4`")
            return BAD
        if isinstance(e, ast.Neg):
            v = self.eval(e.operand, scope)
            if v is BAD:
                return BAD
            if not _is_number(v):
                self.d.error("E0205", "`-` needs a number", e.loc, "negate a number or a numeric constant, e.g. `-0.5`")
                return BAD
            return -v
        if isinstance(e, ast.BinOp):
            return self._binop(e, scope)
        if isinstance(e, ast.ListExpr):
            return [self.eval(x, scope, symbols=True) for x in e.items]
        if isinstance(e, ast.Call):
            return e  # calls are bound where their kind is known
        raise AssertionError(type(e))  # pragma: no cover

    def _binop(self, e: ast.BinOp, scope: Scope):
        value = self._binop_value(e, scope)
        if isinstance(value, float) and not math.isfinite(value):
            self.d.error("E0212", "arithmetic overflow: the result is not a finite number", e.loc,
                         "the value exceeds a 64-bit float (about 1.8e308)")
            return BAD
        return value

    def _binop_value(self, e: ast.BinOp, scope: Scope):
        a, b = self.eval(e.left, scope), self.eval(e.right, scope)
        if a is BAD or b is BAD:
            return BAD
        if not (_is_number(a) and _is_number(b)):
            self.d.error("E0205", f"`{e.op}` needs numbers", e.loc, "arithmetic takes numbers and numeric constants")
            return BAD
        try:
            if e.op == "+":
                return a + b
            if e.op == "-":
                return a - b
            if e.op == "*":
                return a * b
            if e.op == "/":
                if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
                    return a // b
                return a / b
            if e.op == "//":
                return a // b
            if e.op == "%":
                return a % b
        except ZeroDivisionError:
            self.d.error("E0212", "division by zero", e.loc, "the divisor evaluates to 0")
            return BAD
        except (ArithmeticError, OverflowError):
            self.d.error("E0212", "arithmetic overflow", e.loc, "the value exceeds a 64-bit float (about 1.8e308)")
            return BAD
        raise AssertionError(e.op)  # pragma: no cover

    # ---- binding calls to kinds -------------------------------------------------------------
    def bind(self, call: ast.Call, kind: K.Kind, scope: Scope, what: str) -> dict | None:
        """Bind a call's arguments to `kind`'s parameters; `what` names the kind's family in messages."""
        values: dict[str, object] = {}
        locs: dict[str, SourceLoc] = {}
        ok = True
        positional = [a for a in call.args if a.name is None]
        if len(positional) > len(kind.params):
            self.d.error("E0205", f"{what} `{kind.name}` takes at most {len(kind.params)} arguments, "
                                  f"got {len(positional)}", positional[len(kind.params)].loc,
                         _signature(kind))
            ok = False
        for param, arg in zip(kind.params, positional):
            values[param.name], locs[param.name] = arg.value, arg.loc
        for arg in call.args:
            if arg.name is None:
                continue
            if kind.param(arg.name) is None:
                self.d.error("E0204", f"{what} `{kind.name}` has no parameter `{arg.name}`", arg.loc,
                             did_you_mean(arg.name, [p.name for p in kind.params]) or _signature(kind))
                ok = False
                continue
            if arg.name in values:
                self.d.error("E0205", f"parameter `{arg.name}` given twice", arg.loc,
                             "give each parameter once")
                ok = False
            values[arg.name], locs[arg.name] = arg.value, arg.loc
        out: dict[str, object] = {}
        for p in kind.params:
            if p.name not in values:
                if p.default is K.REQUIRED:
                    self.d.error("E0205", f"{what} `{kind.name}` needs `{p.name}`", call.loc, _signature(kind))
                    ok = False
                else:
                    out[p.name] = p.default
                continue
            v = self._check_param(p, values[p.name], locs[p.name], scope, kind)
            ok = ok and v is not BAD
            out[p.name] = v
        return out if ok else None

    def _check_param(self, p: K.Param, expr, loc: SourceLoc, scope: Scope, kind: K.Kind):
        v = self.eval(expr, scope, symbols=p.type in ("symbol", "list"))
        if v is BAD:
            return BAD
        if p.type == "int":
            if isinstance(v, float) and v.is_integer() and not isinstance(v, bool):
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                self.d.error("E0205", f"`{p.name}` must be an integer, got {_show(v)}", loc, _signature(kind))
                return BAD
        elif p.type == "float":
            if not _is_number(v):
                self.d.error("E0205", f"`{p.name}` must be a number, got {_show(v)}", loc, _signature(kind))
                return BAD
            v = float(v)
        elif p.type == "bool":
            if not isinstance(v, bool):
                self.d.error("E0205", f"`{p.name}` must be true or false, got {_show(v)}", loc, _signature(kind))
                return BAD
        elif p.type == "symbol":
            name = v.name if isinstance(v, Symbol) else v if isinstance(v, str) else None
            if name not in p.choices:
                self.d.error("E0206", f"`{p.name}` must be one of {', '.join(p.choices)}; got {_show(v)}", loc,
                             did_you_mean(str(name), p.choices) if name else None)
                return BAD
            v = name
        elif p.type == "schedule":
            v = self._schedule(p, v, loc, scope)
            if v is BAD:
                return BAD
        elif p.type == "layer_schedule":
            v = self._layer_schedule(p, v, loc, scope)
            if v is BAD:
                return BAD
        elif p.type == "list" and not isinstance(v, list):
            v = [v]
        if p.positive and _is_number(v) and v <= 0:
            self.d.error("E0207", f"`{p.name}` must be positive, got {_show(v)}", loc, _signature(kind))
            return BAD
        if p.nonnegative and _is_number(v) and v < 0:
            self.d.error("E0206", f"`{p.name}` must not be negative, got {_show(v)}", loc, _signature(kind))
            return BAD
        return v

    def _schedule_call(self, p: K.Param, v, loc: SourceLoc, scope: Scope, table: dict, what: str):
        """A number, or a call of one of `table`'s schedules: (float, None), (None, bound arguments)
        or (BAD, None) after an error."""
        if _is_number(v):
            return float(v), None
        if not isinstance(v, ast.Call) or v.name not in table:
            hint = f"{what}s: {', '.join(table)}"
            if isinstance(v, ast.Call):
                hint = did_you_mean(v.name, table) or hint
            self.d.error("E0205", f"`{p.name}` must be a number or a {what}, got {_show(v)}", loc, hint)
            return BAD, None
        args = self.bind(v, table[v.name], scope, what)
        return (BAD, None) if args is None else (None, args)

    def _schedule(self, p: K.Param, v, loc: SourceLoc, scope: Scope):
        """A number, or a schedule call (`linear(start, end, steps = N)`, `cosine(...)`)."""
        number, args = self._schedule_call(p, v, loc, scope, K.SCHEDULES, "schedule")
        if args is None:
            return number
        spec = O.ScheduleSpec(kind=v.name, **args)
        if p.positive and min(spec.values()) <= 0:
            self.d.error("E0207", f"`{p.name}` must stay positive; the schedule goes from {spec.start} to "
                                  f"{spec.end}", loc,
                         "give start and end values above 0")
            return BAD
        return spec

    def _lora_on(self, call: ast.Call, args: dict):
        """`lora_on = [up, down]`: the adapted projections, checked, in canonical order (None: all;
        BAD after an error)."""
        loc = next((a.loc for a in call.args if a.name == "lora_on"), call.loc)
        if args["lora_rank"] is None:
            self.d.error("E0211", "`lora_on` without `lora_rank`", loc, "give lora_rank = r as well")
            return BAD
        allowed = K.LORA_PROJECTIONS if call.name == "glu" else ("up", "down")
        values = args["lora_on"]
        names = [v.name if isinstance(v, Symbol) else None for v in values]
        bad = [v for v, n in zip(values, names) if n not in allowed]
        if bad or not names or len(set(names)) != len(names):
            what = (f"`{bad[0].name}` is not a projection of {call.name}" if isinstance(bad[0], Symbol) else
                    "`lora_on` lists projection names") if bad else (
                "`lora_on` lists no projection" if not names else "`lora_on` lists a projection twice")
            self.d.error("E0206", what, loc, f"{call.name} projections: {', '.join(allowed)}")
            return BAD
        chosen = tuple(p for p in allowed if p in names)
        return None if len(chosen) == len(allowed) else chosen

    def _layer_schedule(self, p: K.Param, v, loc: SourceLoc, scope: Scope):
        """A number, or a per-layer schedule call (`layer_linear(start, end)`, `layer_cosine(...)`)."""
        number, args = self._schedule_call(p, v, loc, scope, K.LAYER_SCHEDULES, "per-layer schedule")
        if args is None:
            return number
        return O.LayerScheduleSpec(kind=v.name.removeprefix("layer_"), **args)

    def _depth(self, st: ast.Setting, scope: Scope) -> O.DepthSpec | None:
        """`depth = keep_top(ratio, modalities = [...], weight = ...)`: the block's depth router."""
        call = st.value if isinstance(st.value, ast.Call) else (
            ast.Call(st.value.loc, st.value.name, [], False, st.value.loc) if isinstance(st.value, ast.Ref) else None)
        if call is None or call.name not in K.DEPTH_ROUTERS:
            self.d.error("E0206", "`depth` must be a depth router: " + ", ".join(K.DEPTH_ROUTERS), st.value.loc,
                         did_you_mean(getattr(call, "name", ""), K.DEPTH_ROUTERS)
                         or "e.g. `depth = keep_top(0.5, modalities = [image])`")
            return None
        args = self.bind(call, K.DEPTH_ROUTERS[call.name], scope, "depth router")
        if args is None:
            return None
        ratio = args["ratio"]
        values = ratio.values() if isinstance(ratio, O.LayerScheduleSpec) else (ratio,)
        if any(not 0 < r <= 1 for r in values):
            self.d.error("E0207", f"the kept ratio must be in (0, 1], got {', '.join(_show(r) for r in values)}",
                         call.loc, "a ratio is the fraction of a sequence's candidate tokens the block processes")
            return None
        if isinstance(ratio, O.LayerScheduleSpec) and ratio.shift >= 1:
            self.d.error("E0207", f"`shift` must be below 1 (a fraction of the depth), got {_show(ratio.shift)}",
                         call.loc,
                         "e.g. `layer_cosine(1.0, 0.3, shift = 0.2)`")
            return None
        ids: list[int] = []
        items = next((a.value.items for a in call.args if a.name == "modalities" and isinstance(a.value, ast.ListExpr)),
                     None)
        for i, v in enumerate(args["modalities"] or ()):
            loc = items[i].loc if items and i < len(items) else call.loc
            if not isinstance(v, Symbol) or v.name not in self.input_modalities:
                self.d.error("E0202", f"modality `{getattr(v, 'name', v)}` is not carried by the input", loc,
                             f"input modalities: {', '.join(self.input_modalities)}")
                return None
            if self.modalities.index(v.name) not in ids:
                ids.append(self.modalities.index(v.name))
        if len(ids) == len(self.input_modalities):
            ids = []  # every token is a candidate
        return O.DepthSpec(ratio=ratio, modalities=tuple(sorted(ids)), weight=args["weight"])

    # ---- experts --------------------------------------------------------------------------
    def expert(self, call: ast.Call, scope: Scope) -> O.ExpertSpec | None:
        found = scope.lookup("experts", call.name)
        if found is not None:
            definition, def_scope = found
            params = K.Kind(call.name, tuple(K.Param(p.name, "any") for p in definition.params))
            bound = self._bind_def_args(call, params, scope, "expert")
            if bound is None:
                return None
            if self._def_depth >= MAX_DEF_DEPTH:
                self.d.error("E0104", "expert definitions nest too deeply (recursive definition?)", call.loc,
                             "an expert definition must not refer to itself")
                return None
            self._def_depth += 1
            try:
                return self.expert(definition.body, def_scope.child(bound))
            finally:
                self._def_depth -= 1
        if call.name in K.ZERO_COMPUTATION:
            self.d.error("E0220", f"the zero-computation expert `{call.name}` belongs in a routed pool",
                         call.name_loc or call.loc,
                         f"write `experts N x {call.name}` beside the computed experts of a moe or group")
            return None
        kind = K.EXPERTS.get(call.name)
        if kind is None:
            names = scope.names("experts") | set(K.EXPERTS)
            self.d.error("E0201", f"expert `{call.name}` is not defined", call.name_loc or call.loc,
                         did_you_mean(call.name, names) or f"built-in expert kinds: {', '.join(K.EXPERTS)}")
            return None
        args = self.bind(call, kind, scope, "expert")
        if args is None:
            return None
        if args["lora_alpha"] is not None and args["lora_rank"] is None:
            self.d.error("E0211", "`lora_alpha` without `lora_rank`", call.loc, "give lora_rank = r as well")
            return None
        if args["lora_rank"] is not None and args["weights"] != "full":
            self.d.error("E0206", "LoRA experts adapt full-precision weights, not ternary ones", call.loc,
                         "drop `weights = ternary` or the `lora_rank`")
            return None
        if args["lora_on"] is not None:
            args["lora_on"] = self._lora_on(call, args)
            if args["lora_on"] is BAD:
                return None
        spec = O.ExpertSpec(form=call.name, **args)
        if self.dim and spec.dim != self.dim:
            self.d.error("E0210", f"expert input dimension {spec.dim} does not match the model dimension "
                                  f"{self.dim}", call.loc, "the first argument of an expert is its input width")
            return None
        return spec

    def _bind_def_args(self, call: ast.Call, params: K.Kind, scope: Scope, what: str) -> dict | None:
        """Arguments of a user definition: any value, all required."""
        out: dict[str, object] = {}
        positional = [a for a in call.args if a.name is None]
        names = [p.name for p in params.params]
        ok = True
        if len(positional) > len(names):
            self.d.error("E0205", f"{what} `{call.name}` takes {len(names)} arguments, got {len(positional)}",
                         call.loc, f"{call.name}({', '.join(names)})")
            return None
        for name, arg in zip(names, positional):
            out[name] = self.eval(arg.value, scope, symbols=True)
        for arg in call.args:
            if arg.name is None:
                continue
            if arg.name not in names:
                self.d.error("E0204", f"{what} `{call.name}` has no parameter `{arg.name}`", arg.loc,
                             did_you_mean(arg.name, names) or f"{call.name}({', '.join(names)})")
                ok = False
                continue
            if arg.name in out:
                self.d.error("E0205", f"parameter `{arg.name}` given twice", arg.loc,
                             "give each parameter once")
                ok = False
                continue
            out[arg.name] = self.eval(arg.value, scope, symbols=True)
        missing = [n for n in names if n not in out]
        if missing:
            self.d.error("E0205", f"{what} `{call.name}` needs {', '.join(f'`{m}`' for m in missing)}", call.loc,
                         f"{call.name}({', '.join(names)})")
            ok = False
        if any(v is BAD for v in out.values()):
            ok = False
        return out if ok else None

    # ---- blocks ---------------------------------------------------------------------------
    def block(self, call: ast.Call, scope: Scope) -> BlockSpec | None:
        found = scope.lookup("blocks", call.name)
        if found is None:
            self.d.error("E0201", f"block `{call.name}` is not defined", call.name_loc or call.loc,
                         did_you_mean(call.name, scope.names("blocks")))
            return None
        definition, def_scope = found
        params = K.Kind(call.name, tuple(K.Param(p.name, "any") for p in definition.params))
        bound = self._bind_def_args(call, params, scope, "block")
        if bound is None:
            return None
        cache_key = (call.name, tuple(sorted((k, repr(v)) for k, v in bound.items())))
        if cache_key not in self._block_cache:
            self._block_cache[cache_key] = self._elaborate_block(definition, def_scope.child(bound), bound)
        return self._block_cache[cache_key]

    def _elaborate_block(self, b: ast.BlockDef, scope: Scope, bound: dict) -> BlockSpec | None:
        before = len(self.d.items)
        norm_kind, norm_args, residual, per_modality = "rms", {"eps": 1e-6}, "pre_norm", ()
        depth = None
        for st in self._known_settings([st for st in b.stmts if isinstance(st, ast.Setting)], K.BLOCK_SETTINGS, "block"):
            if st.name.name == "norm":
                value = st.value
                call = value if isinstance(value, ast.Call) else (
                    ast.Call(value.loc, value.name, [], False, value.loc) if isinstance(value, ast.Ref) else None)
                if call is None or call.name not in K.NORMS:
                    self.d.error("E0206", "`norm` must be one of: " + ", ".join(K.NORMS), st.value.loc,
                                 did_you_mean(getattr(call, "name", ""), K.NORMS))
                    continue
                args = self.bind(call, K.NORMS[call.name], scope, "norm")
                if args is not None:
                    norm_kind, norm_args = call.name, args
            elif st.name.name == "per_modality":
                v = self.eval(st.value, scope)
                if v is BAD:
                    continue
                if not isinstance(v, bool):
                    self.d.error("E0205", f"`per_modality` must be true or false, got {_show(v)}", st.value.loc,
                                 "write `per_modality = true`")
                elif v and len(self.input_modalities) < 2:
                    self.d.error("E0206", "`per_modality` needs an input carrying two or more modalities",
                                 st.value.loc, "declare them: `modality text, image` and "
                                               "`input(dim = d, modalities = [text, image])`")
                else:
                    per_modality = tuple(self.modalities.index(m) for m in self.input_modalities) if v else ()
            elif st.name.name == "depth":
                depth = self._depth(st, scope)
            elif st.name.name == "residual":
                v = self.eval(st.value, scope, symbols=True)
                name = v.name if isinstance(v, Symbol) else None
                if name not in K.RESIDUALS:
                    self.d.error("E0206", f"`residual` must be one of {', '.join(K.RESIDUALS)}", st.value.loc,
                                 did_you_mean(str(name), K.RESIDUALS))
                else:
                    residual = name
        sublayers: list[Sublayer] = []
        counters: dict[str, int] = {}
        for st in b.stmts:
            if isinstance(st, ast.Setting):
                continue
            op = self._sublayer(st, scope)
            if op is None:
                continue
            base = op.kind
            n = counters.get(base, 0)
            counters[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
            op = op.model_copy(update={"name": name})
            if isinstance(op, O.AttentionOp | O.AttentionExpertsOp) and op.qk_norm != "none":
                op = op.model_copy(update={"norm_eps": norm_args["eps"]})  # q/k norms take the block's eps
            if depth is not None and isinstance(op, O.LatentAttentionOp | O.AttentionExpertsOp):
                what = "latent_attention has" if isinstance(op, O.LatentAttentionOp) else "attention experts have"
                self.d.error("E0220", f"{what} no Mixture-of-Depths form", st.loc,
                             "a block with `depth = ...` takes attention(...), dense experts and moe { ... }")
            if depth is not None and isinstance(op, O.AttentionOp):
                op = op.model_copy(update={"kept_tokens": True})
            if depth is not None and isinstance(op, O.MoEOp) and op.recurrent is not None:
                self.d.error("E0220", "a recurrent router has no Mixture-of-Depths form: its state covers every "
                                      "token, the block only the kept ones", st.loc,
                             "drop `depth = ...` from this block or `recurrent = ...` from its moe")
            if per_modality and isinstance(op, O.AttentionExpertsOp):
                self.d.error("E0220", "attention experts have no per-modality form", st.loc,
                             "per_modality blocks take attention(...) without experts, dense experts and moe { ... }")
            elif per_modality and isinstance(op, O.AttentionOp | O.FFNOp):
                op = op.model_copy(update={"per_modality": per_modality})
            elif per_modality and not isinstance(op, O.MoEOp):
                self.d.error("E0220", f"`{base}` has no per-modality form", st.loc,
                             "per_modality blocks take attention(...), dense experts and moe { ... }")
            norm = O.NormOp(name=f"{name}_norm", norm=norm_kind, dim=self.dim, eps=norm_args["eps"],
                            per_modality=per_modality, loc=st.loc)
            sublayers.append(Sublayer(norm, op))
        if not sublayers and len(self.d.items) == before:
            self.d.error("E0211", f"block `{b.name.name}` has no sublayers", b.name.loc,
                         "add attention(...), an expert or moe { ... }")
        if len(self.d.items) != before:
            return None
        args = ", ".join(_show(v).strip("`") for v in bound.values())
        return BlockSpec(key=f"{b.name.name}({args})" if b.params else b.name.name, name=b.name.name, residual=residual,
                         sublayers=sublayers, loc=b.loc, depth=depth)

    def _sublayer(self, st, scope: Scope):
        if isinstance(st, ast.MoE):
            return self.moe(st, scope)
        call: ast.Call = st
        if call.name in K.SUBLAYERS:
            args = self.bind(call, K.SUBLAYERS[call.name], scope, "sublayer")
            if args is None:
                return None
            return self.latent_attention(call, args) if call.name == "latent_attention" else self.attention(call, args)
        if scope.lookup("experts", call.name) is not None or call.name in K.EXPERTS or call.name in K.ZERO_COMPUTATION:
            spec = self.expert(call, scope)
            if spec is not None and spec.lora_rank is not None:
                self.d.error("E0220", "LoRA experts are routed: a dense sublayer has no adapters to choose among",
                             call.loc, "use them in a routed pool: `experts N x <expert with lora_rank>`")
                return None
            return None if spec is None else O.FFNOp(name="ffn", expert=spec, loc=call.loc)
        names = set(K.SUBLAYERS) | set(K.EXPERTS) | scope.names("experts")
        self.d.error("E0201", f"`{call.name}` is not a sublayer, expert or built-in kind", call.name_loc or call.loc,
                     did_you_mean(call.name, names) or "a block holds attention(...), experts and moe { ... }")
        return None

    def attention(self, call: ast.Call, a: dict) -> O.AttentionOp | None:
        heads = a["heads"]
        kv = a["kv_heads"] or heads
        head_dim = a["head_dim"]
        if head_dim is None:
            if self.dim % heads:
                self.d.error("E0210", f"model dimension {self.dim} is not divisible by heads = {heads}", call.loc,
                             "give head_dim explicitly or choose heads dividing the model dimension")
                return None
            head_dim = self.dim // heads
        if heads % kv:
            self.d.error("E0210", f"heads = {heads} is not a multiple of kv_heads = {kv}", call.loc,
                         "grouped-query attention shares each kv head among heads / kv_heads query heads")
            return None
        if a["rope_theta"] is not None and head_dim % 2:
            self.d.error("E0210", f"rotary embeddings need an even head_dim, got {head_dim}", call.loc,
                         "rotate-half pairs dimension i with i + head_dim / 2")
            return None
        routed, shared = a["routed_heads"], a["shared_heads"]
        if shared and routed is None:
            self.d.error("E0211", "`shared_heads` without `routed_heads`", call.loc,
                         "mixture-of-heads: give routed_heads = k, the heads each token takes besides the shared ones")
            return None
        if routed is not None and routed + shared > heads:
            self.d.error("E0208", f"routed_heads = {routed} exceeds the {heads - shared} routed heads "
                                  f"(heads - shared_heads)", call.loc,
                         "routed_heads + shared_heads must not exceed heads")
            return None
        experts, top_k = a["experts"], a["top_k"]
        routing_only = [n for n in ("top_k", "renormalize", "load_balance", "z_loss")
                        if a[n] != K.SUBLAYERS["attention"].param(n).default]
        if experts is None and routing_only:
            self.d.error("E0211", f"`{routing_only[0]}` without `experts`", call.loc,
                         "attention experts: give experts = E and top_k = k (the experts each token takes)")
            return None
        if experts is not None:
            if routed is not None:
                self.d.error("E0220", "attention experts do not combine with mixture-of-heads (`routed_heads`)",
                             call.loc, "choose one: experts = E, top_k = k or routed_heads = k")
                return None
            if top_k is None:
                self.d.error("E0211", "`experts` without `top_k`", call.loc,
                             f"give top_k = k, the attention experts each token takes (at most {experts})")
                return None
            if top_k > experts:
                self.d.error("E0208", f"top_k = {top_k} exceeds experts = {experts}", call.loc,
                             "each token takes at most all the attention experts")
                return None
            return O.AttentionExpertsOp(
                name="attention_experts", dim=self.dim, heads=heads, kv_heads=kv, head_dim=head_dim,
                num_experts=experts, top_k=top_k, renormalize=a["renormalize"],
                losses=O.LossSpec(load_balance=a["load_balance"], z_loss=a["z_loss"]), bias=a["bias"],
                causal=a["causal"], rope_theta=a["rope_theta"], qk_norm=a["qk_norm"], out_bias=a["out_bias"],
                loc=call.loc)
        return O.AttentionOp(name="attention", dim=self.dim, heads=heads, kv_heads=kv, head_dim=head_dim,
                             bias=a["bias"], causal=a["causal"], rope_theta=a["rope_theta"], qk_norm=a["qk_norm"],
                             out_bias=a["out_bias"], routed_heads=routed, shared_heads=shared, loc=call.loc)

    def latent_attention(self, call: ast.Call, a: dict) -> O.LatentAttentionOp | None:
        if a["qk_rope_dim"] % 2:
            self.d.error("E0210", f"rotary embeddings need an even qk_rope_dim, got {a['qk_rope_dim']}", call.loc,
                         "rotary embeddings rotate pairs of dimensions")
            return None
        return O.LatentAttentionOp(name="latent_attention", dim=self.dim, loc=call.loc, **a)

    # ---- moe ------------------------------------------------------------------------------
    def moe(self, m: ast.MoE, scope: Scope) -> O.MoEOp | None:
        before = len(self.d.items)
        groups_ast = [s for s in m.stmts if isinstance(s, ast.Group)]
        top = [s for s in m.stmts if not isinstance(s, ast.Group | ast.LossDecl)]
        default_router = None
        routed_top = [s for s in top if isinstance(s, ast.ExpertsDecl) and not s.shared]
        shared_top = [s for s in top if isinstance(s, ast.ExpertsDecl) and s.shared]
        settings = self._moe_settings([s for s in top if isinstance(s, ast.Setting)], scope)
        routers_top = [s for s in top if isinstance(s, ast.RouterDecl)]
        for extra in routers_top[1:]:
            self.d.error("E0203", "router is already given for this moe", extra.loc, "a moe has one router (per group)")
        if routers_top:
            default_router = routers_top[0]
        groups: list[O.GroupSpec] = []
        mods = tuple(range(len(self.modalities)))
        carried = tuple(i for i in mods if self.modalities[i] in self.input_modalities)
        if not groups_ast:
            stmts = routed_top + ([default_router] if default_router else [])
            g = self._group("all", carried, stmts, None, m.loc, scope)
            if g is not None:
                groups.append(g)
        seen: dict[str, SourceLoc] = {}
        for gst in groups_ast:
            idx = []
            for name in gst.modalities:
                if name.name not in self.modalities:
                    self.d.error("E0202", f"modality `{name.name}` is not declared", name.loc,
                                 (did_you_mean(name.name, self.modalities) or "") +
                                 f" declared: {', '.join(self.modalities)}")
                    continue
                if name.name not in self.input_modalities:
                    self.d.error("E0209", f"no input carries modality `{name.name}`", name.loc,
                                 f"the input carries: {', '.join(self.input_modalities)}")
                    continue
                if name.name in seen:
                    self.d.error("E0203", f"modality `{name.name}` already has a group", name.loc,
                                 f"first at {_loc_str(seen[name.name])}")
                    continue
                seen[name.name] = name.loc
                idx.append(self.modalities.index(name.name))
            label = "_".join(n.name for n in gst.modalities)
            g = self._group(label, tuple(idx), gst.stmts, default_router, gst.loc, scope)
            if g is not None:
                groups.append(g)
        if groups_ast and routed_top:  # an inter-modality pool: every token also routes among these experts
            if SHARED_POOL in self.modalities:
                self.d.error("E0203", f"a modality named `{SHARED_POOL}` clashes with the inter-modality pool",
                             routed_top[0].loc, "rename the modality")
            pool = self._group(SHARED_POOL, carried, routed_top + ([default_router] if default_router else []),
                               None, routed_top[0].loc, scope)
            if pool is not None:
                groups.append(pool)
        if groups_ast and not routed_top:
            missing = [x for x in self.input_modalities if x not in seen]
            if missing and len(self.d.items) == before:
                self.d.error("E0211", f"this moe has no group for modality {', '.join(f'`{x}`' for x in missing)}",
                             m.loc, "add a `group` for it; its tokens would otherwise get no expert")
        shared, num_shared = self._shared(shared_top, scope)
        recurrent_loc = settings.pop("recurrent_loc", None)
        if settings["recurrent"] is not None:
            self._check_recurrent(settings, groups, recurrent_loc)
        if settings["shared_gate"] != "none" and not shared_top:
            self.d.error("E0211", "`shared_gate` is set but this moe has no shared experts", m.loc,
                         "add `shared N x <expert>` beside the routed experts")
        losses = self._losses([s for s in m.stmts if isinstance(s, ast.LossDecl)], scope)
        if len(self.d.items) != before or losses is None:
            return None
        return O.MoEOp(name="moe", dim=self.dim, groups=tuple(groups), shared=shared, num_shared=num_shared,
                       losses=losses, **settings, loc=m.loc)

    def _known_settings(self, settings, table: dict, what: str) -> list[ast.Setting]:
        """The settings whose names `table` knows, each name once; the others get E0204 / E0203."""
        kept, seen = [], set()
        for st in settings:
            key = st.name.name
            if key not in table:
                self.d.error("E0204", f"unknown {what} setting `{key}`", st.name.loc,
                             did_you_mean(key, table) or f"{what} settings: " + ", ".join(table))
            elif key in seen:
                self.d.error("E0203", f"{what} setting `{key}` is already given", st.name.loc, "give each setting once")
            else:
                seen.add(key)
                kept.append(st)
        return kept

    def _moe_settings(self, settings: list[ast.Setting], scope: Scope) -> dict:
        """`shared_gate = none | sigmoid`, `iterations = C` and `recurrent = gru(...)`; returns the
        MoEOp fields they set (and `recurrent_loc`, where the recurrent router was written)."""
        out = {"shared_gate": "none", "iterations": 1, "recurrent": None}
        for st in self._known_settings(settings, K.MOE_SETTINGS, "moe"):
            if st.name.name == "iterations":
                out["iterations"] = self._count(st.value, scope, "iterations", MAX_ITERATIONS) or 1
                continue
            if st.name.name == "recurrent":
                out["recurrent"], out["recurrent_loc"] = self._recurrent(st.value, scope), st.loc
                continue
            v = self.eval(st.value, scope, symbols=True)
            if v is BAD:
                continue
            name = v.name if isinstance(v, Symbol) else None
            if name not in K.SHARED_GATES:
                self.d.error("E0206", f"`shared_gate` must be one of {', '.join(K.SHARED_GATES)}", st.value.loc,
                             did_you_mean(str(name), K.SHARED_GATES))
                continue
            out["shared_gate"] = name
        return out

    def _recurrent(self, expr: ast.Expr, scope: Scope) -> O.RecurrentSpec | None:
        """`recurrent = gru(hidden = H, projection = p)`: the RMoE router's cell and sizes."""
        if not (isinstance(expr, ast.Call) and expr.name in K.RECURRENT):
            name = expr.name if isinstance(expr, ast.Call | ast.Ref) else None
            self.d.error("E0205", "`recurrent` must be a recurrent cell such as gru(hidden = 32)", expr.loc,
                         (did_you_mean(name, K.RECURRENT) if name else None)
                         or f"cells: {', '.join(_signature(k) for k in K.RECURRENT.values())}")
            return None
        args = self.bind(expr, K.RECURRENT[expr.name], scope, "recurrent cell")
        if args is None:
            return None
        return O.RecurrentSpec(cell=expr.name, hidden=args["hidden"], projection=args["projection"] or args["hidden"])

    def _check_recurrent(self, settings: dict, groups: list[O.GroupSpec], loc: SourceLoc) -> None:
        """What a recurrent router cannot be combined with (each refused, never ignored)."""
        hint = "drop `recurrent` or the other setting"
        if settings["iterations"] > 1:
            self.d.error("E0220", "a recurrent router in a chain of experts (`iterations` > 1) is not supported: "
                                  "the iterations' routers would need their own order of state updates", loc, hint)
        for g in groups:
            where = "" if g.name == "all" else f" (group `{g.name}`)"
            if not g.router.learned:
                self.d.error("E0220", f"a recurrent router needs router logits; the `{g.router.kind}` router"
                                      f"{where} has none", loc, "use a learned router such as top_k(k = 2)")
            elif g.router.jitter:
                self.d.error("E0220", f"router `jitter`{where} with a recurrent router is not supported (the gate "
                                      "reads the GRU state, not the token)", loc, hint)

    def _check_recurrent_stack(self, stack: list[BlockSpec]) -> None:
        """One GRU cell serves every MoE layer: all of them are recurrent, with the same sizes."""
        moes = [sub.op for block in stack for sub in block.sublayers if isinstance(sub.op, O.MoEOp)]
        recurrent = [op for op in moes if op.recurrent is not None]
        if not recurrent:
            return
        plain = next((op for op in moes if op.recurrent is None), None)
        if plain is not None:
            self.d.error("E0220", "this moe has no recurrent router, but others do: the router state would skip it",
                         plain.loc, f"add `recurrent = {_recurrent_text(recurrent[0].recurrent)}` here too "
                                    f"(first at {_loc_str(recurrent[0].loc)})")
        first = recurrent[0]
        for op in recurrent[1:]:
            if op.recurrent != first.recurrent:
                self.d.error("E0210", f"recurrent router `{_recurrent_text(op.recurrent)}` differs from "
                                      f"`{_recurrent_text(first.recurrent)}` at {_loc_str(first.loc)}", op.loc,
                             "every MoE layer shares one GRU cell: give them the same hidden and projection sizes")
                return

    def _shared(self, decls: list[ast.ExpertsDecl], scope: Scope) -> tuple[O.ExpertSpec | None, int]:
        for extra in decls[1:]:
            self.d.error("E0203", "shared experts are already given here", extra.loc,
                         "write one `shared N x expert` statement")
        if not decls:
            return None, 0
        n = self._count(decls[0].count, scope)
        spec = self.expert(decls[0].expert, scope)
        if n is None or spec is None:
            return None, 0
        if spec.lora_rank is not None:
            self.d.error("E0220", "shared experts are always on: LoRA experts belong in a routed pool", decls[0].loc,
                         "use a dense expert for `shared`, e.g. `shared 1 x glu(d, f)`")
            return None, 0
        return spec, n

    def _count(self, expr: ast.Expr, scope: Scope, what: str = "expert count", limit: int = MAX_EXPERTS) -> int | None:
        v = self.eval(expr, scope)
        if v is BAD:
            return None
        example = {"repeat count": "e.g. `repeat 4 { my_block }`", "iterations": "e.g. `iterations = 2`"}.get(
            what, "e.g. `experts 8 x ffn`")
        if not isinstance(v, int) or isinstance(v, bool):
            self.d.error("E0205", f"{what} must be an integer, got {_show(v)}", expr.loc,
                         example + (" (`//` divides to an integer)" if isinstance(v, float) else ""))
            return None
        if v <= 0:
            self.d.error("E0207", f"{what} must be positive, got {v}", expr.loc, example)
            return None
        if v > limit:
            self.d.error("E0206", f"{what} {v} exceeds the limit of {limit}", expr.loc,
                         f"moec builds at most {limit} per statement")
            return None
        return v

    def _group(self, name, modalities, stmts, default_router, loc, scope) -> O.GroupSpec | None:
        routed = [s for s in stmts if isinstance(s, ast.ExpertsDecl) and not s.shared]
        zero_computation = {"identity": 0, "zero": 0}
        for s in [s for s in routed if s.expert.name in K.ZERO_COMPUTATION]:
            routed.remove(s)
            if s.expert.args:
                self.d.error("E0205", f"`{s.expert.name}` takes no arguments", s.expert.loc,
                             f"write `experts N x {s.expert.name}`")
            n = self._count(s.count, scope)
            if zero_computation[s.expert.name]:
                self.d.error("E0203", f"`{s.expert.name}` experts are already given for this pool", s.loc,
                             "give their count in one statement")
            zero_computation[s.expert.name] = n or 0
        shared = [s for s in stmts if isinstance(s, ast.ExpertsDecl) and s.shared]
        routers = [s for s in stmts if isinstance(s, ast.RouterDecl)]
        for s in stmts:
            if isinstance(s, ast.Setting):
                self.d.error("E0204", f"unknown group setting `{s.name.name}`", s.name.loc,
                             "a group holds `experts N x <expert>`, `shared N x <expert>` and `router ...`")
        for extra in routed[1:]:
            self.d.error("E0203", "routed experts are already given for this group", extra.loc,
                         "write one `experts N x expert` statement per group")
        for extra in routers[1:]:
            self.d.error("E0203", "router is already given for this group", extra.loc, "a group has one router")
        if not routed:
            self.d.error("E0211", "no routed experts here", loc, "add `experts N x <expert>`")
            return None
        router_decl = routers[0] if routers else default_router
        if router_decl is None:
            self.d.error("E0211", "no router for these experts", loc, "add e.g. `router top_k(k = 2)`")
            return None
        n = self._count(routed[0].count, scope)
        spec = self.expert(routed[0].expert, scope)
        n_routed = None if n is None else n + sum(zero_computation.values())
        router = self.router(router_decl.router, scope, n_routed)
        if router is not None and router.by in ("modality", "task") and name != "all":
            self.d.error("E0206", f"routing by {router.by} inside a modality group is not supported",
                         router_decl.loc, "use deterministic routing in a moe without groups")
            router = None
        shared_spec, num_shared = self._shared(shared, scope)
        if n is None or spec is None or router is None:
            return None
        return O.GroupSpec(name=name, modalities=modalities, num_experts=n, expert=spec, router=router,
                           shared=shared_spec, num_shared=num_shared, num_identity=zero_computation["identity"],
                           num_zero=zero_computation["zero"])

    def router(self, call: ast.Call, scope: Scope, num_experts: int | None) -> O.RouterSpec | None:
        kind = K.ROUTERS.get(call.name)
        if kind is None:
            self.d.error("E0204", f"unknown router `{call.name}`", call.name_loc or call.loc,
                         did_you_mean(call.name, K.ROUTERS) or f"routers: {', '.join(K.ROUTERS)}")
            return None
        args = self.bind(call, kind, scope, "router")
        if args is None or num_experts is None:
            return None

        def arg_loc(name: str):
            a = next((a for a in call.args if a.name == name), None)
            if a is None:
                idx = [p.name for p in kind.params].index(name)
                positional = [a for a in call.args if a.name is None]
                a = positional[idx] if idx < len(positional) else None
            return a.loc if a else call.loc

        def bad(code: str, name: str, message: str, hint: str | None = None) -> None:
            self.d.error(code, message, arg_loc(name), hint)

        n = call.name
        if "k" in args and args["k"] > num_experts:
            bad("E0208", "k", f"k = {args['k']} exceeds the {num_experts} experts it routes among",
                f"use k <= {num_experts}")
            return None
        if n == "dynamic_k":
            args["k_max"] = args["k_max"] or num_experts
            if not 0 < args["threshold"] <= 1:
                bad("E0206", "threshold", f"threshold must be in (0, 1], got {args['threshold']}")
                return None
            if args["k_max"] > num_experts:
                bad("E0208", "k_max", f"k_max = {args['k_max']} exceeds the {num_experts} experts", None)
                return None
            if args["k_min"] > args["k_max"]:
                bad("E0206", "k_min", f"k_min = {args['k_min']} exceeds k_max = {args['k_max']}")
                return None
            args["k"] = args.pop("k_max")
        if n == "group_limited":
            if num_experts % args["groups"]:
                bad("E0206", "groups", f"{num_experts} experts do not split into {args['groups']} equal groups",
                    "choose `groups` dividing the expert count")
                return None
            if args["top_groups"] > args["groups"]:
                bad("E0206", "top_groups", f"top_groups = {args['top_groups']} exceeds groups = {args['groups']}")
                return None
            if args["k"] > args["top_groups"] * (num_experts // args["groups"]):
                bad("E0208", "k", f"k = {args['k']} exceeds the {args['top_groups'] * (num_experts // args['groups'])} "
                                  "experts of the kept groups")
                return None
        if args.get("temperature", 1.0) != 1.0 and args.get("score") != "softmax":
            bad("E0206", "temperature", "`temperature` divides the logits of a softmax score",
                "use score = softmax (the default) or drop `temperature`")
            return None
        if n == "deterministic" and args["by"] == "modality" and num_experts < len(self.modalities):
            bad("E0206", "by", f"routing by modality needs an expert per modality: {num_experts} experts, "
                               f"{len(self.modalities)} modalities")
            return None
        return O.RouterSpec(kind=n, **args)

    def _losses(self, decls: list[ast.LossDecl], scope: Scope) -> O.LossSpec | None:
        values: dict[str, float] = {}
        ok = True
        for decl in decls:
            for term in decl.terms:
                kind = K.LOSSES.get(term.name)
                if kind is None:
                    self.d.error("E0204", f"unknown loss `{term.name}`", term.name_loc or term.loc,
                                 did_you_mean(term.name, K.LOSSES) or f"losses: {', '.join(K.LOSSES)}")
                    ok = False
                    continue
                if term.name in values:
                    self.d.error("E0203", f"loss `{term.name}` is already given", term.loc, "give each loss term once")
                    ok = False
                    continue
                args = self.bind(term, kind, scope, "loss")
                if args is None:
                    ok = False
                    continue
                values[term.name] = args["coef"]
        return O.LossSpec(**values) if ok else None

    # ---- model ----------------------------------------------------------------------------
    def model(self, m: ast.Model) -> ModelSpec | None:
        scope = Scope(parent=self.global_scope)
        modality_decls: list[ast.Name] = []
        inputs, layers, targets, placement = [], [], [], []
        for st in m.stmts:
            if isinstance(st, ast.ModalityDecl):
                for name in st.names:
                    prev = next((x for x in modality_decls if x.name == name.name), None)
                    if prev:
                        self.d.error("E0203", f"modality `{name.name}` is already declared", name.loc,
                                     f"first declared at {_loc_str(prev.loc)}")
                    else:
                        modality_decls.append(name)
            elif isinstance(st, ast.InputDecl):
                inputs.append(st)
            elif isinstance(st, ast.Layers):
                layers.append(st)
            elif isinstance(st, ast.TargetDecl):
                targets.append(st)
            elif isinstance(st, ast.PlacementDecl):
                placement.append(st)
            else:
                self.declare(scope, st)
        self.modalities = tuple(n.name for n in modality_decls) or ("default",)
        self.input_modalities = self.modalities
        if not inputs:
            self.d.error("E0211", f"model `{m.name.name}` has no input", m.name.loc,
                         "declare the model width, e.g. `input(dim = 512)`")
            return None
        for extra in inputs[1:]:
            self.d.error("E0203", "input is already declared", extra.loc,
                         f"a model has one input, declared at line {inputs[0].loc.line}")
        args = self.bind(ast.Call(inputs[0].loc, "input", inputs[0].args, True), K.INPUT, scope, "declaration")
        if args is None:
            return None
        self.dim = args["dim"]
        if args["modalities"] is not None:
            carried = []
            for v, e in zip(args["modalities"], _list_items(inputs[0])):
                if not isinstance(v, Symbol) or v.name not in self.modalities:
                    self.d.error("E0202", f"modality `{getattr(v, 'name', v)}` is not declared", e.loc,
                                 f"declared: {', '.join(self.modalities)}")
                else:
                    carried.append(v.name)
            self.input_modalities = tuple(carried)
        if not layers:
            self.d.error("E0211", f"model `{m.name.name}` has no layers", m.name.loc,
                         "add e.g. `layers { repeat 4 { my_block } }`")
            return None
        for extra in layers[1:]:
            self.d.error("E0203", "layers are already given", extra.loc,
                         f"a model has one layer stack, given at line {layers[0].loc.line}")
        stack: list[BlockSpec] = []
        self._expand(layers[0].items, scope, stack)
        if self.d.has_errors:
            return None
        if not stack:
            self.d.error("E0211", "the layer stack is empty", layers[0].loc, "name blocks in it, e.g. `layers { repeat 4 { my_block } }`")
            return None
        self._check_recurrent_stack(stack)
        if self.d.has_errors:
            return None
        last = stack[-1].sublayers[-1].norm
        final = (O.NormOp(name="final_norm", norm=last.norm, dim=self.dim, eps=last.eps, loc=layers[0].loc)
                 if stack[-1].residual == "pre_norm" else None)
        return ModelSpec(
            name=m.name.name, path=m.loc.path, dim=self.dim, modalities=self.modalities,
            input_modalities=self.input_modalities, layers=stack, final_norm=final, loc=m.loc,
            targets={t.name.name: self._target_settings(t, scope) for t in targets},
            placement=self._placement(placement, scope),
        ) if self._check_targets(targets) else None

    def _check_targets(self, targets: list[ast.TargetDecl]) -> bool:
        """Target sections hold per-target knobs; the name must be a target moec knows."""
        ok = True
        for t in targets:
            if t.name.name not in K.TARGETS:
                self.d.error("E0204", f"unknown target `{t.name.name}`", t.name.loc,
                             did_you_mean(t.name.name, K.TARGETS) or f"targets: {', '.join(K.TARGETS)}")
                ok = False
        return ok

    def _target_settings(self, t: ast.TargetDecl, scope: Scope) -> dict:
        if t.name.name == "hls":
            return self._hls_settings(t, scope)
        if t.name.name == "triton":
            return self._triton_settings(t, scope)
        for s in t.settings:
            self.d.error("E0204", f"unknown {t.name.name} setting `{s.name.name}`", s.name.loc,
                         f"`target {t.name.name}` takes no settings; knobs exist for `target triton` and `target hls`")
        return {}

    def _triton_settings(self, t: ast.TargetDecl, scope: Scope) -> dict:
        """`target triton { block_m = 64; ... }`: tile sizes, each a power of two >= 16."""
        out: dict = {}
        for s in self._known_settings(t.settings, K.TRITON_SETTINGS, "triton"):
            v = self.eval(s.value, scope)
            if v is BAD:
                continue
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1):
                self.d.error("E0206", f"`{s.name.name}` must be a power of two >= 16, got {_show(v)}", s.value.loc,
                             "e.g. 16, 32, 64 or 128")
                continue
            out[s.name.name] = v
        return out

    def _hls_settings(self, t: ast.TargetDecl, scope: Scope) -> dict:
        """`target hls { weights = fixed(16, 6); reuse = 4; ... }`: checked knobs of the HLS backend.
        A precision becomes {"width", "integer", "round", "overflow"}."""
        out: dict = {}
        for s in self._known_settings(t.settings, K.HLS_SETTINGS, "hls"):
            key = s.name.name
            value = self._hls_value(key, s.value, scope)
            if value is not BAD:
                out[key] = value
        return out

    def _hls_value(self, key: str, expr, scope: Scope):
        if key in K.HLS_PRECISIONS:
            if not (isinstance(expr, ast.Call) and expr.name == "fixed"):
                self.d.error("E0205", f"`{key}` must be a fixed-point type such as fixed(16, 6)", expr.loc,
                             "write fixed(width, integer, round = nearest|truncate|convergent, "
                             "overflow = saturate|wrap)")
                return BAD
            args = self.bind(expr, K.FIXED, scope, "type")
            if args is None:
                return BAD
            if not 2 <= args["width"] <= K.HLS_MAX_WIDTH or not 1 <= args["integer"] <= args["width"]:
                self.d.error("E0206", f"fixed({args['width']}, {args['integer']}) is not supported: width must be "
                             f"2..{K.HLS_MAX_WIDTH} and integer bits 1..width", expr.loc,
                             "e.g. fixed(16, 6): 16 bits, 6 of them integer bits (sign included)")
                return BAD
            return {k: (v.name if isinstance(v, Symbol) else v) for k, v in args.items()}
        v = self.eval(expr, scope)
        if v is BAD:
            return BAD
        if key in K.HLS_STRINGS:
            if not isinstance(v, str) or not v or not all(c.isalnum() or c in "-_." for c in v):
                self.d.error("E0205", f"`{key}` must be a part name string of letters, digits, `-`, `_` and `.`",
                             expr.loc, 'e.g. part = "xcu250-figd2104-2L-e"')
                return BAD
            return v
        kind, low, high, meaning = K.HLS_NUMBERS[key]
        if kind == "int" and isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_number(v) or (kind == "int" and not isinstance(v, int)):
            self.d.error("E0205", f"`{key}` must be {'an integer' if kind == 'int' else 'a number'}, got {_show(v)}",
                         expr.loc, f"`{key}`: {meaning}")
            return BAD
        if not low <= v <= high:
            self.d.error("E0206", f"`{key}` must lie in [{low}, {high}], got {v}", expr.loc, f"`{key}`: {meaning}")
            return BAD
        return v

    def _placement(self, decls: list[ast.PlacementDecl], scope: Scope) -> dict:
        """`placement { devices = 8; memory = "80GB"; redundant = 8 }`: defaults for `moec place`
        (never numerics). Checked here; the command line overrides them."""
        out: dict = {}
        for s in self._known_settings([s for p in decls for s in p.settings], K.PLACEMENT_SETTINGS, "placement"):
            key = s.name.name
            v = self.eval(s.value, scope)
            if v is BAD:
                continue
            if key == "memory":
                if not isinstance(v, str):
                    self.d.error("E0205", "`memory` must be a string such as \"80GB\"", s.value.loc, 'e.g. `memory = "80GB"`')
                    continue
                try:
                    K.parse_bytes(v)
                except ValueError as exc:
                    self.d.error("E0205", str(exc).split(": expected")[0], s.value.loc, 'e.g. `memory = "80GB"` or "512MiB" '
                                 "(KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)")
                    continue
            elif not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "devices" else 0):
                self.d.error("E0207" if isinstance(v, int) and not isinstance(v, bool) else "E0205",
                             f"`{key}` must be a {'positive' if key == 'devices' else 'non-negative'} integer, "
                             f"got {_show(v)}", s.value.loc, f"`{key}`: {K.PLACEMENT_SETTINGS[key]}")
                continue
            out[key] = v
        return out

    def _expand(self, items, scope: Scope, out: list[BlockSpec]) -> bool:
        """Append the blocks of `items` to `out`; False once the stack grew past MAX_LAYERS."""
        for item in items:
            if isinstance(item, ast.Repeat):
                n = self._count(item.count, scope, "repeat count")
                body: list[BlockSpec] = []
                if not self._expand(item.items, scope, body):
                    return False
                if n is None:
                    continue
                if n > MAX_LAYERS or len(body) * n + len(out) > MAX_LAYERS:
                    self.d.error("E0206", f"the layer stack would have more than {MAX_LAYERS} layers", item.loc,
                                 "lower a `repeat` count")
                    return False
                out.extend(body * n)
            else:
                spec = self.block(item.call, scope)
                if spec is not None:
                    out.append(spec)
        return True


def _list_items(decl: ast.InputDecl) -> list[ast.Expr]:
    for a in decl.args:
        if a.name == "modalities" or (a.name is None and decl.args.index(a) == 1):
            return a.value.items if isinstance(a.value, ast.ListExpr) else [a.value]
    return []


def _recurrent_text(r: O.RecurrentSpec) -> str:
    return f"{r.cell}(hidden = {r.hidden}, projection = {r.projection})"


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _show(v) -> str:
    if isinstance(v, Symbol):
        return f"`{v.name}`"
    if isinstance(v, ast.Call):
        return f"a call `{v.name}(...)`"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def _signature(kind: K.Kind) -> str:
    parts = []
    for p in kind.params:
        parts.append(p.name if p.default is K.REQUIRED else f"{p.name} = {_show(p.default) if p.default is not None else 'auto'}")
    return f"{kind.name}({', '.join(parts)})"


def elaborate(program: Program, diags: Diagnostics, require_model: bool = True) -> ModelSpec | None:
    el = Elaborator(diags)
    for f in program.files:
        for item in f.definitions:
            el.declare(el.global_scope, item)
    root = program.root
    if root is None:
        return None
    if not root.models:
        if require_model:
            diags.error("E0211", f"`{root.path}` defines no model", SourceLoc(root.path, 1, 1),
                        "write `model name { ... }`")
        return None
    for extra in root.models[1:]:
        diags.error("E0203", "a file holds one model", extra.name.loc, "move other models to their own files")
    try:
        return el.model(root.models[0])
    except RecursionError:
        diags.error("E0104", "expression nested too deeply", root.models[0].loc, "split it into several constants")
        return None
