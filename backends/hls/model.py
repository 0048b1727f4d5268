"""IR graph -> the view-model the templates render: buffers, weights, kernel configurations and
one step per kernel call, in the graph's (deterministic, topological) order.

Token-valued IR tensors are buffers `act_t buf[MAX_TOKENS][dim]` of the whole sequence. The rows
of an expert group (`select_tokens`) are the same buffer plus a modality mask; kernels working on
a group skip the other rows and leave zeros in their output rows, so `scatter_tokens` is free and
groups are summed by `add`. Buffers are reused once their last reader has run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moec import ops as O
from moec.backends import BackendError
from moec.ir import Graph, Value, format_value

from .names import Namer, top_identifier
from .precision import HlsConfig

# Attributes each op kind's lowering here implements. Any other attribute that differs from its
# default (a feature this target does not generate) is an error rather than silently dropped;
# None: every attribute of the kind is handled.
HANDLED_FIELDS: dict[str, set[str] | None] = {
    "input": None, "output": None, "add": None, "select_tokens": None, "scatter_tokens": None, "permute": None,
    "aux_loss": None,
    "norm": {"norm", "dim", "eps"},
    "attention": {"dim", "heads", "kv_heads", "head_dim", "bias", "causal"},
    "ffn": {"expert"},
    "router": {"dim", "num_experts", "router", "balance_rate"},  # balance_rate: group_limited only (refused)
    "route": {"router", "num_experts"},
    "fused_experts": {"num_experts", "expert"},
}
EXPERT_FIELDS = {"form", "dim", "hidden", "act", "bias", "weights"}
ROUTER_FIELDS = {"kind", "k", "score", "renormalize", "scale", "capacity", "by", "jitter", "drop"}
ACT_IDS = {"identity": "ACT_IDENTITY", "relu": "ACT_RELU", "silu": "ACT_SILU", "gelu": "ACT_GELU",
           "gelu_tanh": "ACT_GELU_TANH"}
MAX_MODALITIES = 64  # modality masks are 64-bit


# Ops that only a language feature the target lacks produces: name the feature, not the op.
FEATURE_OF_OP = {**{kind: "zero-computation experts" for kind in ("mask_experts", "identity_experts", "count_experts")},
                 "depth_route": "Mixture-of-Depths (`depth = keep_top(...)`)",
                 "attention_experts": "attention experts (attention(experts = ...))",
                 "router_state": "recurrent routers (`recurrent = gru(...)`: a GRU state carried between MoE layers)"}


@dataclass
class Buffer:
    """A logical buffer; `name` is the physical array it was assigned."""

    dim: int
    name: str = ""


@dataclass
class Weight:
    """One weight array. `key` is the PyTorch state_dict entry it comes from; `layout` says how:
    "linear" ([out, in] -> [in][out]), "stacked" ([E, in, out], as is), "vector", "ternary_linear" /
    "ternary_stacked" (the same with codes in {-1, 0, 1}) or "scales" (absmean scale per matrix)."""

    cname: str
    keys: tuple[str, ...]
    layout: str
    size: int
    offchip: bool = False
    ctype: str = "weight_t"
    partition: int = 1  # cyclic ARRAY_PARTITION factor (the lanes reading it in parallel)

    @property
    def arg(self) -> str:
        """The top-function parameter of an off-chip weight."""
        return f"{self.cname}_axi"


@dataclass(frozen=True)
class LinearShape:
    n_in: int
    n_out: int
    lanes: int
    reuse: int
    bias: bool

    @property
    def cname(self) -> str:
        return f"moec_linear_{self.n_in}x{self.n_out}_l{self.lanes}_r{self.reuse}{'_b' if self.bias else ''}"

    @property
    def multipliers(self) -> int:
        return -(-self.lanes // self.reuse)


@dataclass
class Step:
    kind: str  # template macro: norm, attention, add, route_top_k, route_fixed, experts, ffn
    comment: str
    args: dict = field(default_factory=dict)
    reads: list[Buffer] = field(default_factory=list)
    writes: list[Buffer] = field(default_factory=list)


@dataclass
class Project:
    name: str  # top function and file stem
    source: str
    dim: int
    modalities: tuple[str, ...]
    config: HlsConfig
    steps: list[Step]
    weights: list[Weight]
    linears: list[LinearShape]
    buffers: list[str]  # physical buffer names, each [MAX_TOKENS][dim]
    buffer_dims: dict[str, int]
    queues: list[tuple[str, int]]  # (name, experts)
    input: Buffer
    output: Buffer
    uses_task: bool = False

    @property
    def onchip_weights(self) -> list[Weight]:
        return [w for w in self.weights if not w.offchip]

    @property
    def offchip_weights(self) -> list[Weight]:
        return [w for w in self.weights if w.offchip]


class _Builder:
    def __init__(self, graph: Graph, config: HlsConfig):
        self.g = graph
        self.cfg = config
        self.steps: list[Step] = []
        self.weights: list[Weight] = []
        self.linears: dict[LinearShape, None] = {}
        self.buf: dict[Value, Buffer] = {}
        self.mask: dict[Value, int] = {}
        self.queue: dict[int, str] = {}  # router/route node -> queue name
        self.queues: list[tuple[str, int]] = []
        self.names = Namer()
        self.all_mask = 0
        self.uses_task = False

    # ---- helpers ------------------------------------------------------------------------
    def linear(self, n_in: int, n_out: int, bias: bool) -> str:
        lanes = max(1, min(n_out, self.cfg.max_unroll))
        shape = LinearShape(n_in, n_out, lanes, self.cfg.reuse, bias)
        self.linears.setdefault(shape, None)
        return shape.cname

    def weight(self, key: str, layout: str, size: int, offchip: bool = False, ctype: str = "weight_t",
               keys: tuple[str, ...] | None = None, n_out: int = 1) -> str:
        partition = max(1, min(n_out, self.cfg.max_unroll))
        w = Weight(self.names("w_" + key.replace(".", "_")), keys or (key,), layout, size, offchip, ctype,
                   partition)
        self.weights.append(w)
        return w.arg if offchip else w.cname

    def step(self, kind: str, op: O.OpBase, reads: list[Buffer], writes: list[Buffer], **args) -> None:
        where = f" ({op.loc.path.rsplit('/', 1)[-1]}:{op.loc.line})" if op.loc else ""
        comment = "".join(c if c.isprintable() and c not in "*/\\" else "_" for c in f"{op.kind} {op.name}{where}")
        self.steps.append(Step(kind, comment, args, reads, writes))

    def new(self, value: Value, dim: int, mask: int | None = None) -> Buffer:
        b = Buffer(dim)
        self.buf[value] = b
        self.mask[value] = self.all_mask if mask is None else mask
        return b

    def unsupported(self, op: O.OpBase, what: str) -> BackendError:
        where = f"{op.loc}: " if op.loc else ""
        return BackendError(f"{where}the hls target does not support {what} (`{op.name}`); it supports "
                            "attention, norms, dense and expert FFNs (full or ternary), top_k routers (softmax or "
                            "sigmoid, without capacity) and deterministic routing by modality, task or hash")

    # ---- ops ----------------------------------------------------------------------------
    def build(self) -> None:
        for node in self.g.nodes():
            op = self.g.op(node)
            handler = getattr(self, f"op_{op.kind}", None)
            if handler is None or op.kind not in HANDLED_FIELDS:
                feature = FEATURE_OF_OP.get(op.kind, f"the `{op.kind}` op (compile with the default pipeline)")
                raise self.unsupported(op, feature)
            self.check_fields(op)
            handler(node, op)

    def check_fields(self, op: O.OpBase) -> None:
        """Refuse attributes (of the op, its expert or its router) this target would ignore."""
        handled = HANDLED_FIELDS[op.kind]
        specs = [(op, handled, op.kind)]
        for attr, fields in (("expert", EXPERT_FIELDS), ("router", ROUTER_FIELDS)):
            if handled is not None and attr in handled:
                spec = getattr(op, attr)
                if attr == "router" and spec.kind not in ("top_k", "deterministic"):
                    continue  # the handler names the unsupported router kind
                specs.append((spec, fields, f"an {attr}" if attr == "expert" else f"a `{spec.kind}` router"))
        for spec, fields, what in specs:
            if fields is None:
                continue
            for name, info in type(spec).model_fields.items():
                if name in fields or name in O.OpBase.model_fields or name == "kind":
                    continue
                if getattr(spec, name) != info.default:
                    raise self.unsupported(op, f"{what} with `{name} = {format_value(getattr(spec, name))}`")

    def op_input(self, node: int, op: O.InputOp) -> None:
        if len(op.modalities) > MAX_MODALITIES:
            raise BackendError(f"the hls target supports at most {MAX_MODALITIES} modalities")
        self.all_mask = (1 << len(op.modalities)) - 1
        self.input = self.new(Value(node, 0), op.dim)

    def op_output(self, node: int, op: O.OutputOp) -> None:
        self.output = self.buf[self.g.inputs(node)[0]]
        self.steps.append(Step("output", "output", {}, [self.output], []))

    def op_norm(self, node: int, op: O.NormOp) -> None:
        (x,) = self.g.inputs(node)
        layer = op.norm == "layer"
        out = self.new(Value(node, 0), op.dim)
        gain = self.weight(f"{op.name}.weight", "vector", op.dim)
        bias = self.weight(f"{op.name}.bias", "vector", op.dim) if layer else "0"
        self.step("norm", op, [self.buf[x]], [out], x=self.buf[x], y=out, dim=op.dim, layer=layer,
                  eps=repr(float(op.eps)), gain=gain, bias=bias)

    def op_attention(self, node: int, op: O.AttentionOp) -> None:
        (x,) = self.g.inputs(node)
        if op.heads % op.kv_heads:
            raise self.unsupported(op, "heads that are not a multiple of kv_heads")
        out = self.new(Value(node, 0), op.dim)
        qd, kd = op.heads * op.head_dim, op.kv_heads * op.head_dim
        args = {"qc": self.linear(op.dim, qd, op.bias), "kc": self.linear(op.dim, kd, op.bias),
                "oc": self.linear(qd, op.dim, op.bias)}
        for proj, n_in, n_out in (("q", op.dim, qd), ("k", op.dim, kd), ("v", op.dim, kd), ("o", qd, op.dim)):
            args[f"w{proj}"] = self.weight(f"{op.name}.{proj}_proj.weight", "linear", n_in * n_out, n_out=n_out)
            args[f"b{proj}"] = self.weight(f"{op.name}.{proj}_proj.bias", "vector", n_out) if op.bias else "0"
        self.step("attention", op, [self.buf[x]], [out], x=self.buf[x], y=out, dim=op.dim, heads=op.heads,
                  kv_heads=op.kv_heads, head_dim=op.head_dim, causal=op.causal, **args)

    def op_add(self, node: int, op: O.AddOp) -> None:
        a, b = self.g.inputs(node)
        if a not in self.buf and b not in self.buf:
            return  # a sum of routing statistics (expert counts): not part of the inference output
        if a not in self.buf or b not in self.buf:
            raise self.unsupported(op, "a sum of a token tensor and a value this target does not compute")
        out = self.new(Value(node, 0), self.buf[a].dim, self.mask[a] | self.mask[b])
        self.step("add", op, [self.buf[a], self.buf[b]], [out], a=self.buf[a], b=self.buf[b], y=out,
                  dim=out.dim)

    def op_select_tokens(self, node: int, op: O.SelectTokensOp) -> None:
        x = self.g.inputs(node)[0]
        self.buf[Value(node, 0)] = self.buf[x]
        self.mask[Value(node, 0)] = sum(1 << m for m in op.modalities) & self.mask[x]

    def op_scatter_tokens(self, node: int, op: O.ScatterTokensOp) -> None:
        y = self.g.inputs(node)[0]  # group rows are already in token order, zero elsewhere
        self.buf[Value(node, 0)] = self.buf[y]
        self.mask[Value(node, 0)] = self.mask[y]

    def op_permute(self, node: int, op: O.PermuteOp) -> None:
        """Queues are built by the router step; nothing to emit."""

    def op_aux_loss(self, node: int, op: O.AuxLossOp) -> None:
        """Training-only term; the inference top function does not compute it."""

    def _queue(self, node: int, experts: int) -> str:
        name = f"moec_q{len(self.queues)}"  # the project's own name space (names.py)
        self.queues.append((name, experts))
        self.queue[node] = name
        return name

    def op_router(self, node: int, op: O.RouterOp) -> None:
        r = op.router
        if r.kind != "top_k":
            raise self.unsupported(op, f"`{r.kind}` routers")
        if r.capacity is not None:
            raise self.unsupported(op, "expert capacity (token dropping)")
        if r.k > self.cfg.max_unroll:
            raise self.unsupported(op, f"k = {r.k} above max_unroll = {self.cfg.max_unroll} (the top-k list is unrolled)")
        (x,) = self.g.inputs(node)
        q = self._queue(node, op.num_experts)
        gate = self.weight(f"{op.name}.weight", "linear", op.dim * op.num_experts, n_out=op.num_experts)
        self.step("route_top_k", op, [self.buf[x]], [], x=self.buf[x], dim=op.dim, experts=op.num_experts, k=r.k,
                  softmax=r.score == "softmax", renormalize=r.renormalize, scale=repr(float(r.scale)),
                  mask=self.mask[x], gate=gate, queue=q, gc=self.linear(op.dim, op.num_experts, False))

    def op_route(self, node: int, op: O.RouteOp) -> None:
        r = op.router
        if r.kind != "deterministic":
            raise self.unsupported(op, f"`{r.kind}` routing without a fused router")
        ids = Value(node, 1)
        consumers = [n for n, _ in self.g.users(ids) if self.g.op(n).kind == "fused_experts"]
        mask = self.mask.get(self.g.inputs(consumers[0])[0], self.all_mask) if consumers else self.all_mask
        self.uses_task |= r.by == "task"
        q = self._queue(node, op.num_experts)
        self.step("route_fixed", op, [], [], experts=op.num_experts,
                  by={"modality": "BY_MODALITY", "task": "BY_TASK", "hash": "BY_HASH"}[r.by], mask=mask, queue=q)

    def _ffn_weights(self, name: str, ex: O.ExpertSpec, experts: int | None, offchip: bool) -> dict:
        """Weight arrays of one FFN (experts=None: an nn.Linear-based FeedForward) or a stack."""
        stacked = experts is not None
        e = experts or 1
        ternary = ex.weights == "ternary"
        mats = ("up", "gate", "down") if ex.form == "glu" else ("up", "down")
        out: dict = {}
        for m in mats:
            key = f"{name}.{m}_proj" if stacked else f"{name}.{m}_proj.weight"
            layout = ("ternary_" if ternary else "") + ("stacked" if stacked else "linear")
            out[f"w_{m}"] = self.weight(key, layout, e * ex.dim * ex.hidden, offchip,
                                        "tern_t" if ternary else "weight_t",
                                        n_out=ex.dim if m == "down" else ex.hidden)
            if ex.bias:
                n = ex.dim if m == "down" else ex.hidden
                bkey = f"{name}.{m}_bias" if stacked else f"{name}.{m}_proj.bias"
                out[f"b_{m}"] = self.weight(bkey, "vector", e * n)
            else:
                out[f"b_{m}"] = "0"
        out.setdefault("w_gate", "0")
        out.setdefault("b_gate", "0")
        if ternary:
            keys = tuple((f"{name}.{m}_proj" if stacked else f"{name}.{m}_proj.weight") if m in mats else ""
                         for m in ("up", "gate", "down"))
            out["scales"] = self.weight(f"{name}.scales", "scales", 3 * e, keys=keys)
        else:
            out["scales"] = "0"
        out["wt"] = "tern_t" if ternary else "weight_t"
        return out

    def _expert_args(self, ex: O.ExpertSpec) -> dict:
        ternary = ex.weights == "ternary"
        return {"dim": ex.dim, "hidden": ex.hidden, "glu": ex.form == "glu", "act": ACT_IDS[ex.act],
                "ternary": ternary, "bias": ex.bias,
                "upc": self.linear(ex.dim, ex.hidden, ex.bias),
                "downc": self.linear(ex.hidden, ex.dim, False)}

    def op_ffn(self, node: int, op: O.FFNOp) -> None:
        (x,) = self.g.inputs(node)
        ex = op.expert
        out = self.new(Value(node, 0), ex.dim, self.mask[x])
        args = self._expert_args(ex) | self._ffn_weights(op.name, ex, None, False)
        self.step("ffn", op, [self.buf[x]], [out], x=self.buf[x], y=out, mask=self.mask[x], **args)

    def op_fused_experts(self, node: int, op: O.FusedExpertsOp) -> None:
        x, ids = self.g.inputs(node)[:2]
        ex = op.expert
        q = self.queue.get(ids.node)
        if q is None:
            raise self.unsupported(op, "experts without a router")
        offchip = ex.dim * ex.hidden > self.cfg.m_axi_threshold
        out = self.new(Value(node, 0), ex.dim, self.mask[x])
        args = self._expert_args(ex) | self._ffn_weights(op.name, ex, op.num_experts, offchip)
        self.step("experts", op, [self.buf[x]], [out], x=self.buf[x], y=out, experts=op.num_experts,
                  stream=offchip, queue=q, **args)

    # ---- buffer assignment --------------------------------------------------------------
    def assign_buffers(self) -> tuple[list[str], dict[str, int]]:
        """Physical arrays for logical buffers: a buffer is free again after its last reader."""
        last: dict[int, int] = {}
        for i, s in enumerate(self.steps):
            for b in s.reads:
                last[id(b)] = i
        free: dict[int, list[str]] = {}
        physical: list[str] = []
        dims: dict[str, int] = {}
        self.input.name = "buf_in"
        physical.append("buf_in")
        dims["buf_in"] = self.input.dim
        for i, s in enumerate(self.steps):
            for b in s.writes:
                if b.name:
                    continue
                pool = free.setdefault(b.dim, [])
                if pool:
                    b.name = pool.pop()
                else:
                    b.name = f"buf{len(physical) - 1}"
                    physical.append(b.name)
                    dims[b.name] = b.dim
            for b in {id(b): b for b in s.reads}.values():
                if last.get(id(b)) == i and b is not self.input and b is not self.output:
                    free.setdefault(b.dim, []).append(b.name)
        return physical, dims


def route_type(project: Project) -> tuple[int, int]:
    """(width, integer bits) of route_t, the routing weights in the queues: unsigned, holding the
    largest router scale."""
    scale = max([float(s.args["scale"]) for s in project.steps if s.kind == "route_top_k"] + [1.0])
    integer = max(1, math.floor(math.log2(scale)) + 1)
    frac = max(project.config.activations.frac, 12)
    return integer + frac, integer


def build_project(graph: Graph, config: HlsConfig, source: str = "") -> Project:
    """The view-model of `graph` (after the default pipeline) for the templates."""
    b = _Builder(graph, config)
    b.build()
    if not any(s.kind in ("experts", "route_top_k", "route_fixed") for s in b.steps):
        raise BackendError(f"model `{graph.name}` has no MoE layer; the hls target generates MoE models")
    buffers, dims = b.assign_buffers()
    return Project(name=top_identifier(graph.name), source=source, dim=b.input.dim,
                   modalities=graph.op(graph.find("input")[0]).modalities, config=config, steps=b.steps,
                   weights=b.weights, linears=list(b.linears), buffers=buffers, buffer_dims=dims, queues=b.queues,
                   input=b.input, output=b.output, uses_task=b.uses_task)
