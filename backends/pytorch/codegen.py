"""Lowered IR -> one readable Python file per model (+ the runtime module next to it).

Each block kind becomes an nn.Module class whose forward is the layer's ops in order, one
statement per op. The chain permute -> expert_gemm (gate/up) -> activation -> expert_gemm (down)
-> combine is legalised into one `moe_experts(...)` call (sorted grouped GEMMs in the runtime).
Names from the .moe file pass through `py_name` before reaching generated code.
"""

from __future__ import annotations

import functools
import keyword
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources

import jinja2
from moec import __version__
from moec import ops as O
from moec.backends import BackendError
from moec.ir import Graph, Value
from moec.passes.place_experts import PlacementError, check_plan

# The runtime modules shipped next to every generated file: module -> (source file, names it exports),
# in import order (each after the runtime modules it imports: moec.load imports them in this order)
RUNTIME_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "moec_cpu_fused": ("cpu_fused.py", ()),  # imported by moec_runtime, so first
    "moec_runtime": ("runtime.py", (
        "Attention", "AttentionExperts", "Container", "Experts", "FeedForward", "LatentAttention", "LoRAExperts", "ModelOutput",
        "PerModality", "RMSNorm", "activate", "modality_masks", "modality_rows",
        "check_modality", "combine", "expert_counts", "expert_offsets", "gather_rows", "grouped_linear",
        "identity_experts", "load_balance_loss", "mask_experts", "merge_group_routing", "moe_experts",
        "moe_lora_experts",
        "moe_experts_groups", "router_logits",
        "permute", "route_top_k", "scatter_tokens", "select_tokens", "sort_by_expert", "ternarize", "z_loss")),
    "moec_routers": ("routers.py", (
        "BalancedRouter", "Schedule", "apply_capacity", "route_deterministic", "route_dynamic_k",
        "route_expert_choice", "route_top_k_temperature",
        "route_group_limited", "route_soft", "router_jitter", "token_positions")),
    "moec_depth": ("depth.py", ("DepthRouter", "depth_combine")),
    "moec_expert_parallel": ("expert_parallel.py", ("ExpertParallelExperts", "moe_experts_ep")),
    "moec_static_runtime": ("static_runtime.py", (
        "expert_counts_static", "load_balance_loss_static", "moe_experts_static", "token_mask_for",
        "z_loss_static")),
}
_RESERVED = {*(n for _, names in RUNTIME_MODULES.values() for n in names), "Model", "torch", "nn", "self",
             "modality", "task"}


def py_name(name: str) -> str:
    """A safe Python identifier for a name from a .moe file (keywords, names of the runtime and
    attributes of nn.Module, such as `forward` or `training`, get a `_`)."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", name)
    if not name or name[0].isdigit():
        name = "_" + name
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in _RESERVED or name in _module_attributes():
        name += "_"
    return name


def module_name(name: str) -> str:
    """The file name (without .py) of a generated model: `py_name`, kept clear of the runtime
    modules shipped next to it and of the standard library modules they import."""
    module = py_name(name)
    while module in RUNTIME_MODULES or module == "moec_triton" or module in sys.stdlib_module_names:
        module += "_"
    return module


@functools.cache
def _module_attributes() -> frozenset[str]:
    import torch.nn

    return frozenset(dir(torch.nn.Module()))  # an instance: `training` too


def _class_name(key: str) -> str:
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", key) if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) + "Block"


@dataclass
class BlockView:
    name: str
    class_name: str
    loc: str
    modules: list = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    returns: str = ""
    sync_notes: list[str] = field(default_factory=list)  # one entry per host synchronisation
    init_params: list[str] = field(default_factory=list)  # constructor arguments that differ per layer

    @property
    def host_syncs(self) -> int:
        return len(self.sync_notes)

    @property
    def sync_summary(self) -> str:
        counts = Counter(self.sync_notes)
        return "; ".join(f"{n} x {what}" for what, n in counts.items())


@dataclass
class LayerCall:
    """How the model constructs one layer: its block class and per-layer constructor arguments."""

    cls: str
    args: str = ""


@dataclass
class _Module:
    attr: str
    ctor: str


def _call(lhs: str, fn: str, args: list[str], width: int = 104) -> str:
    """`lhs = fn(args)` on one line, or one argument per line when that is too long (and one
    target per line, in parentheses, when the targets alone are)."""
    one = f"{lhs} = {fn}({', '.join(args)})"
    if len(one) <= width:
        return one
    inner = "".join(f"\n            {a}," for a in args)
    if len(f"{lhs} = {fn}(") > width and ", " in lhs:
        lhs = "(" + "".join(f"\n            {name}," for name in lhs.split(", ")) + "\n        )"
    return f"{lhs} = {fn}({inner}\n        )"


def _norm_ctor(op: O.NormOp) -> str:
    cls = "RMSNorm" if op.norm == "rms" else "nn.LayerNorm"
    return f"{cls}({op.dim}, eps={op.eps!r})"


def _ffn_ctor(e: O.ExpertSpec, gate: str = "none") -> str:
    ternary = ", ternary=True" if e.weights == "ternary" else ""
    ternary += ", output_gate=True" if gate == "sigmoid" else ""
    return (f"FeedForward(dim={e.dim}, hidden={e.hidden}, glu={e.form == 'glu'}, "
            f"activation={e.act!r}, bias={e.bias}{ternary})")


def _attention_options(op: O.AttentionOp | O.AttentionExpertsOp) -> str:
    """The rotary / q-k norm / output-bias arguments of an attention module, only where they are set."""
    extra = f", rope_theta={op.rope_theta!r}" if op.rope_theta is not None else ""
    if op.qk_norm != "none":
        extra += f", qk_norm={op.qk_norm!r}, norm_eps={op.norm_eps!r}"
    if op.out_bias is not None and op.out_bias != op.bias:
        extra += f", out_bias={op.out_bias}"
    return extra


def _attention_ctor(op: O.AttentionOp) -> str:
    extra = _attention_options(op)
    if op.routed_heads is not None:
        extra += f", routed_heads={op.routed_heads}, shared_heads={op.shared_heads}"
    return (f"Attention(dim={op.dim}, heads={op.heads}, kv_heads={op.kv_heads}, "
            f"head_dim={op.head_dim}, bias={op.bias}, causal={op.causal}{extra})")


def _attention_experts_ctor(op: O.AttentionExpertsOp) -> str:
    extra = _attention_options(op)
    if op.renormalize:
        extra += ", renormalize=True"
    if op.losses.load_balance:
        extra += f", load_balance={op.losses.load_balance!r}"
    if op.losses.z_loss:
        extra += f", z_loss={op.losses.z_loss!r}"
    return (f"AttentionExperts(\n            dim={op.dim}, heads={op.heads}, kv_heads={op.kv_heads}, "
            f"head_dim={op.head_dim}, num_experts={op.num_experts}, top_k={op.top_k},\n"
            f"            bias={op.bias}, causal={op.causal}{extra},\n        )")


def _latent_attention_ctor(op: O.LatentAttentionOp) -> str:
    return (f"LatentAttention(dim={op.dim}, heads={op.heads}, kv_rank={op.kv_rank}, "
            f"qk_nope_dim={op.qk_nope_dim}, qk_rope_dim={op.qk_rope_dim}, v_dim={op.v_dim}, q_rank={op.q_rank}, "
            f"rope_theta={op.rope_theta!r}, rope_interleave={op.rope_interleave}, bias={op.bias}, eps={op.eps!r})")


def _weight(attr: str, name: str, weights: str) -> str:
    """An expert weight as the kernels see it: ternary weights are quantised on the fly."""
    return f"ternarize({attr}.{name})" if weights == "ternary" else f"{attr}.{name}"


_MERGED = "<merged>"  # a group output already included in its MoE layer's single expert call


class _BlockEmitter:
    """Emits the class of the block kind that layer `layer` instantiates."""

    merges_groups = True  # modality groups that partition the tokens run as one expert call
    static = False  # the static-shape form: no shape depends on the data

    def __init__(self, graph: Graph, nodes: list[int], view: BlockView, expert_parallel: bool = False):
        merging = self.merges_groups and not expert_parallel
        if merging:
            nodes = self._route_first(graph, nodes)
        self.merged = {r for r, members in self._regions(graph, nodes).items()
                       if merging and self._merged(graph, members)}  # MoE regions run as one expert call
        self.group_masks: dict[str, str] = {}  # group path of a merged region -> its token mask
        self.g, self.view, self.expert_parallel = graph, view, expert_parallel
        self.modalities = graph.op(graph.find("input")[0]).modalities  # declared, in id order
        self.expert_offset: dict[str, int] = {}  # MoE region -> experts of its groups emitted so far
        self.expert_start: dict[tuple, int] = {}  # module path of an expert group -> its first expert id
        self.nodes = nodes  # the layer's ops in topological order
        self.in_layer = set(self.nodes)
        self.names: dict[Value, str] = {}
        self.used: set[str] = set()
        self.tree: dict = {}  # nested attribute tree of submodules
        self.region_inputs: dict[tuple[str, Value], str] = {}
        self.region_anchor: dict[str, str] = {}
        self.routers: dict[str, str] = {}  # module path of an expert group -> its router attribute
        self.kept_tokens = False  # between a depth_route and its depth_combine
        self.depth_route = ""  # the name of the current depth route
        self.selections: dict[tuple, str] = {}  # (modality ids, modalities) -> the selected tokens' index / mask
        self.rows_of_modalities: dict[tuple, str] = {}  # (modality ids, per-modality ids) -> their token rows
        self.recurrent = bool(graph.find("router_state"))  # blocks take and return a recurrent router's state
        if self.recurrent:
            self.used |= {"router_state", "router_gru"}  # the forward arguments of the state and the GRU cell

    # ---- modality groups as one expert call -------------------------------------------------
    @staticmethod
    def _regions(graph: Graph, nodes: list[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for n in nodes:
            parts = graph.op(n).name.split(".")[2:]
            if len(parts) > 1:
                out.setdefault(parts[0], []).append(n)
        return out

    @staticmethod
    def _group_key(graph: Graph, node: int) -> str:
        """The expert group an op belongs to: its module path without the op's own name."""
        return ".".join(graph.op(node).name.split(".")[2:-1])

    @classmethod
    def _route_first(cls, graph: Graph, nodes: list[int]) -> list[int]:
        """Within a merged MoE layer, everything the expert call needs (every group's selection,
        routing and masks) before the first group's experts."""
        order = list(nodes)
        for members in cls._regions(graph, nodes).values():
            if not cls._merged(graph, members):
                continue
            inside, early, stack = set(members), set(), [n for n in members if graph.op(n).kind == "fused_experts"]
            while stack:
                for v in graph.inputs(stack.pop()):
                    if v.node in inside and v.node not in early:
                        early.add(v.node)
                        stack.append(v.node)
            first = min(order.index(n) for n in members)
            rest = [n for n in order if n not in early]
            order = rest[:first] + [n for n in order if n in early] + rest[first:]
        return order

    @classmethod
    def _merged(cls, graph: Graph, members: list[int]) -> bool:
        """Groups selected by disjoint modalities, each routed once per token by a learned router
        whose choice does not depend on the other tokens (no capacity, no expert choice, no
        balancing bias), with experts of one kind (not LoRA) and nothing else per group: one
        expert call."""
        ops = [graph.op(n) for n in members]
        experts = [n for n in members if graph.op(n).kind == "fused_experts"]
        groups = [cls._group_key(graph, n) for n in experts]
        selects = {cls._group_key(graph, n): graph.op(n).modalities for n in members
                   if graph.op(n).kind == "select_tokens"}
        allowed = {"select_tokens", "router", "permute", "fused_experts", "scatter_tokens", "add", "aux_loss"}
        if len(experts) < 2 or len(set(groups)) != len(groups) or not set(groups) <= set(selects):
            return False
        shared_ffn = [op for n, op in zip(members, ops) if op.kind == "ffn" and cls._group_key(graph, n) in selects]
        if shared_ffn or any(op.kind not in allowed | {"ffn"} for op in ops):
            return False
        routers = [op.router for op in ops if op.kind == "router"]
        if any(r.kind not in ("top_k", "dynamic_k", "soft") or r.capacity is not None for r in routers):
            return False
        seen = [m for mods in selects.values() for m in mods]
        kinds = {graph.op(n).expert for n in experts}
        # LoRA experts stay per group: one merged call would have to build their merged weights
        return len(seen) == len(set(seen)) and len(kinds) == 1 and next(iter(kinds)).lora_rank is None

    # ---- naming -----------------------------------------------------------------------------
    def rel(self, node: int) -> list[str]:
        parts = self.g.op(node).name.split(".")[2:]  # drop "layers.<i>"
        return [py_name(p) for p in parts]

    def region(self, node: int) -> str | None:
        parts = self.rel(node)
        return parts[0] if len(parts) > 1 else None

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used or name in _RESERVED or name == "x":
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def ref(self, value: Value, consumer: int) -> str:
        if value.node not in self.in_layer and self.g.op(value.node).kind == "router_state":
            return "router_state"  # an earlier layer's state: the block's argument, already [T, hidden]
        if value.node not in self.in_layer:
            port = value.port if self.g.op(value.node).kind == "input" else 0
            base = ("x", "modality", "task")[port]
            region = self.region(consumer)
            if region is None:
                return base
            return self._flat(region, value, base)
        name = self.names[value]
        src_region, dst_region = self.region(value.node), self.region(consumer)
        if src_region == dst_region:
            return name
        if dst_region is None:  # leaving an MoE region: restore the token layout
            t = self.g.type_of(value)
            if t is not None and t.shape and t.shape[0] == "T":
                return f"{name}.view({self.region_anchor[src_region]}.shape)"
            return name
        return self._flat(dst_region, value, name)

    def _flat(self, region: str, value: Value, name: str) -> str:
        key = (region, value)
        if key not in self.region_inputs:
            t = self.g.type_of(value)
            if len(t.shape) == 1:  # per-token ids
                flat = self.fresh(f"{region}_{name.removesuffix('_kept')}")
                self.view.body.append(f"{flat} = {name}.reshape(-1)")
            else:
                flat = self.fresh(f"{name}_flat")
                self.view.body.append(f"{flat} = {name}.reshape(-1, {t.shape[-1]})")
                self.region_anchor.setdefault(region, name)
            self.region_inputs[key] = flat
        return self.region_inputs[key]

    def assign(self, node: int, bases: list[str]) -> list[str]:
        region = self.region(node)
        group = self.rel(node)[1] if region and len(self.rel(node)) > 2 else None
        prefix = f"{group}_" if group else ""
        out = []
        for v, base in zip(self.g.outputs(node), bases):
            # block-level values reuse `x` / `h` like hand-written code; others get unique names
            name = base if region is None and base in ("x", "h", "x_kept") and self._dead_after(base, node) else \
                self.fresh(prefix + base)
            self.names[v] = name
            self.used.add(name)
            out.append(name)
        return out

    def assign_values(self, values: list[Value], bases: list[str], node: int) -> list[str]:
        """Name some outputs of `node` (the others stay unnamed)."""
        prefix = f"{self.group_of(node)}_" if self.group_of(node) else ""
        out = []
        for v, base in zip(values, bases):
            self.names[v] = name = self.fresh(prefix + base)
            out.append(name)
        return out

    def group_of(self, node: int) -> str | None:
        rel = self.rel(node)
        return rel[1] if self.region(node) and len(rel) > 2 else None

    def _dead_after(self, name: str, node: int) -> bool:
        """True if no later op reads the value currently called `name` (so it may be reused)."""
        live = [v for v, n in self.names.items() if n == name]
        order = {n: i for i, n in enumerate(self.nodes)}
        for v in live:
            for user, _ in self.g.users(v):
                if user in order and order[user] > order[node]:
                    return False
        return True

    def module(self, path: list[str], ctor: str) -> str:
        t = self.tree
        for p in path[:-1]:
            t = t.setdefault(p, {})
        t[path[-1]] = ctor
        return "self." + ".".join(path)

    # ---- statements: one method per op kind --------------------------------------------------
    def emit(self) -> None:
        for node in self.nodes:
            op = self.g.op(node)
            handler = getattr(self, f"_op_{op.kind}", None)
            if handler is None:
                raise ValueError(f"the pytorch backend has no lowering for op `{op.kind}` ({op.name})")
            handler(node, op, [self.ref(v, node) for v in self.g.inputs(node)], self.rel(node))
        aux_terms, counts = [], []
        for node in self.nodes:
            for v in self.g.outputs(node):
                if any(self.g.op(user).kind == "output" for user, _ in self.g.users(v)):
                    (counts if self.g.type_of(v).dtype == "i64" else aux_terms).append(self.names[v])
        states = [self.names[v] for n in self.nodes if self.g.op(n).kind == "router_state" for v in self.g.outputs(n)]
        out = [self.names[v] for n in self.nodes for v in self.g.outputs(n) if self.g.op(n).kind != "router_state"
               and any(u not in self.in_layer and self.g.op(u).kind != "output" for u, _ in self.g.users(v))]
        aux = " + ".join(aux_terms) if aux_terms else "x.new_zeros((), dtype=torch.float32)"
        cnt = ("torch.cat([" + ", ".join(counts) + "])" if len(counts) > 1 else counts[0]) if counts else "None"
        self.view.returns = f"{out[0]}, {aux}, {cnt}"
        if self.recurrent:  # the state after this block's last MoE layer (a block without one passes it on)
            self.view.returns += f", {states[-1] if states else 'router_state'}"
        self.view.modules = [_Module(attr, _ctor(sub, used=len(f"        self.{attr} = "))) for attr, sub in self.tree.items()]

    def line(self, text: str) -> None:
        self.view.body.append(text)

    def modality_rows(self, ids_name: str, op: O.OpBase) -> str:
        """The name of the per-modality token rows of `ids_name`, computed once per block."""
        key = (ids_name, op.per_modality)
        if key not in self.rows_of_modalities:
            self.rows_of_modalities[key] = name = self.fresh("rows")
            self.line(f"{name} = modality_rows({ids_name}, {tuple(op.per_modality)!r})")
            self.view.sync_notes.append("tokens of each modality")
        return self.rows_of_modalities[key]

    def per_modality(self, op: O.OpBase, ctor: str) -> str:
        """`PerModality(ids, text=ctor, image=ctor)` for a Mixture-of-Transformers op, else ctor."""
        ids = getattr(op, "per_modality", ())
        if not ids:
            return ctor
        copies = "".join(f"\n            {py_name(self.modalities[i])}={ctor}," for i in ids)
        return f"PerModality(\n            {tuple(ids)!r},{copies}\n        )"

    def _op_norm(self, node, op, ins, path):
        attr = self.module(path, self.per_modality(op, _norm_ctor(op)))
        if op.per_modality:
            ins = [ins[0], self.modality_rows(ins[1], op)]
        (h,) = self.assign(node, ["h"])
        self.line(f"{h} = {attr}({', '.join(ins)})")

    def _op_depth_route(self, node, op, ins, path):
        mods = f", modalities={tuple(op.modalities)!r}" if op.modalities else ""
        weight = f", weight={op.weight!r}" if op.weight != "sigmoid" else ""
        static = ", static=True" if op.modalities and self.static else ""  # every row, a mask of the kept
        attr = self.module(path, f"DepthRouter(dim={op.dim}, ratio=ratio{mods}{weight}{static})")
        self.view.init_params.append("ratio")
        if op.modalities and not self.static:  # the kept rows and the padded length (else both static)
            self.view.sync_notes += ["Mixture-of-Depths token selection"] * 2
        route, x, modality, task = self.g.outputs(node)
        (r,) = self.assign_values([route], ["route"], node)
        self.line(f"{r} = {attr}({ins[0]}, {ins[1]})")
        self.depth_route = r
        (xk,) = self.assign_values([x], ["x_kept"], node)
        self.line(f"{xk} = {r}.select_rows({ins[0]})")
        for value, base, ids in ((modality, "modality_kept", ins[1]), (task, "task_kept", ins[2])):
            if self.g.users(value):
                (name,) = self.assign_values([value], [base], node)
                self.line(f"{name} = {r}.select_ids({ids})")
        self.kept_tokens = True

    def _op_depth_combine(self, node, op, ins, path):
        (x,) = self.assign(node, ["x"])
        self.line(f"{x} = depth_combine({', '.join(ins)})")
        self.kept_tokens = False

    def _op_attention(self, node, op, ins, path):
        if op.kept_tokens:
            ins = [*ins[:-1], f"route={ins[-1]}"]
        ctor = _attention_ctor(op)
        if op.per_modality:
            names = {py_name(self.modalities[i]): i for i in op.per_modality}
            head, args = ctor.split("(", 1)
            ctor = f"{head}(\n            {args[:-1]},\n            per_modality={names!r},\n        )"
            if op.kept_tokens and not self.static:  # the projections select rows of the padded kept tokens
                self.view.sync_notes += ["tokens of each modality"] * 4 * len(op.per_modality)
            else:  # the static form's route pads nothing: the kept rows' masks fit the padded rows
                ins = [ins[0], self.modality_rows(ins[1], op), *ins[2:]]
        attr = self.module(path, ctor)
        (h,) = self.assign(node, ["h"])
        self.line(f"{h} = {attr}({', '.join(ins)})")

    def _op_attention_experts(self, node, op, ins, path):
        if self.expert_parallel:
            raise BackendError("the expert-parallel form has no attention experts yet (placement covers the "
                               "moe { ... } experts only)")
        attr = self.module(path, _attention_experts_ctor(op))
        h, aux, counts = self.assign(node, ["h", "aux", "counts"])
        self.line(f"{h}, {aux}, {counts} = {attr}({ins[0]})")

    def _op_latent_attention(self, node, op, ins, path):
        attr = self.module(path, _latent_attention_ctor(op))
        (h,) = self.assign(node, ["h"])
        self.line(f"{h} = {attr}({ins[0]})")

    def _op_ffn(self, node, op, ins, path):
        attr = self.module(path, self.per_modality(op, _ffn_ctor(op.expert, op.gate)))
        if op.per_modality:
            ins = [ins[0], self.modality_rows(ins[1], op)]
        (h,) = self.assign(node, ["h" if self.region(node) is None else path[-1]])
        self.line(f"{h} = {attr}({', '.join(ins)})")

    def _op_add(self, node, op, ins, path):
        live = [i for i in ins if i != _MERGED]
        if len(live) < 2:  # a group whose output the merged expert call already holds
            self.names[self.g.outputs(node)[0]] = live[0] if live else _MERGED
            return
        base = ("x_kept" if self.kept_tokens else "x") if self.region(node) is None else "y"
        (x,) = self.assign(node, [base])
        self.line(f"{x} = {ins[0]} + {ins[1]}")

    def _op_select_tokens(self, node, op, ins, path):
        if self.region(node) in self.merged:  # the group routes every token; its mask picks its own
            xs, idx = self.g.outputs(node)
            self.names[xs] = ins[0]
            self.names[idx] = mask = self.fresh(f"{self.group_of(node)}_mask")
            self.group_masks[self.group_of_path(path)] = mask
            self.line(f"{mask} = token_mask_for({ins[1]}, {tuple(op.modalities)!r})")
            return
        if (ins[1], op.modalities) in self.selections:  # the same tokens again (a group's router state)
            xs_value, idx_value = self.g.outputs(node)
            self.names[idx_value] = idx = self.selections[(ins[1], op.modalities)]
            (xs,) = self.assign_values([xs_value], ["state"], node)
            self.line(f"{xs} = {ins[0]}.index_select(0, {idx})")
            return
        xs, idx = self.assign(node, ["x", "idx"])
        self.line(f"{idx} = select_tokens({ins[1]}, {tuple(op.modalities)!r})")
        self.line(f"{xs} = {ins[0]}.index_select(0, {idx})")
        self.view.sync_notes.append("token selection by modality")
        self.selections[(ins[1], op.modalities)] = idx

    def _op_router_state(self, node, op, ins, path):
        """h_l = GRU(P_l x_l, h_{l-1}): this layer's projection, the model's shared cell (`router_gru`,
        an argument of forward); the first MoE layer's previous state is None (zeros)."""
        attr = self.module([*path[:-1], "router_projection"], f"nn.Linear({op.dim}, {op.projection}, bias=False)")
        (state,) = self.assign(node, ["state"])
        projected = self.fresh("router_input")
        self.line(f"{projected} = {attr}({ins[0]})")
        self.line(f"{state} = router_gru({projected}, {ins[1] if len(ins) > 1 else 'router_state'})")

    def _op_scatter_tokens(self, node, op, ins, path):
        if self.region(node) in self.merged:  # already [T, d] (or part of the merged call)
            self.names[self.g.outputs(node)[0]] = ins[0]
            return
        (y,) = self.assign(node, ["out"])
        self.line(f"{y} = scatter_tokens({ins[0]}, {ins[1]}, {ins[2]})")

    def _gate(self, logits: str, path: list[str], op, x: str, jitter: float, score_bias: bool = False) -> str:
        """`logits = router(x)` (with input jitter in training); returns the router module path.
        `score_bias`: the router keeps a selection bias (group-limited routing), even when not updated."""
        ctor = (f"BalancedRouter({op.dim}, {op.num_experts}, rate={op.balance_rate!r})"
                if op.balance_rate or score_bias else f"nn.Linear({op.dim}, {op.num_experts}, bias=False)")
        attr = self.module(path, ctor)
        if jitter:
            noisy = self.fresh(f"{logits}_input")
            self.line(f"{noisy} = router_jitter({x}, {jitter!r}, self.training)")
            x = noisy
        self.line(f"{logits} = {attr}({x})")
        self.routers[self.group_of_path(path)] = attr
        return attr

    def _feeds_group_limited(self, node: int) -> bool:
        """Whether a router gate's logits feed group-limited routing (which reads the gate's score bias)."""
        return any(self.g.op(u).kind == "route" and self.g.op(u).router.kind == "group_limited"
                   for u, _ in self.g.users(self.g.outputs(node)[0]))

    def group_of_path(self, path: list[str]) -> str:
        return ".".join(path[:-1])

    def _route(self, outs: list[str], source: str, r: O.RouterSpec, num_experts: int, path: list[str],
               mask: list[str], positions: str | None = None) -> None:
        """Routes the rows `source` (logits or tokens); `mask`: the token_mask argument of the tokens
        whose choices a balancing bias counts (the static form's group rows are all tokens);
        `positions`: the rows' positions in their sequences (hash routing's key)."""
        w, ids, probs = outs
        lhs = f"{w}, {ids}, {probs}"
        e = num_experts
        if r.kind == "top_k" and r.temperature != 1.0:  # a tempered (possibly annealed) softmax gate
            self.line(_call(lhs, "route_top_k_temperature", [
                source, f"k={r.k}", f"temperature={self._value(r.temperature, path, 'temperature')}",
                f"renormalize={r.renormalize}"]))
            if r.scale != 1.0:
                self.line(f"{w} = {w} * {r.scale!r}")
            if r.capacity is not None:
                self.line(_call(f"{w}, {ids}, _dropped", "apply_capacity",
                                [w, ids, str(e), f"capacity_factor={r.capacity!r}", f"policy={r.drop!r}"]))
        elif r.kind == "top_k":
            self.line(_call(lhs, "route_top_k", [source, f"k={r.k}", f"score={r.score!r}",
                                                 f"renormalize={r.renormalize}", f"scale={r.scale!r}"]))
            if r.capacity is not None:
                self.line(_call(f"{w}, {ids}, _dropped", "apply_capacity",
                                [w, ids, str(e), f"capacity_factor={r.capacity!r}", f"policy={r.drop!r}"]))
        elif r.kind == "expert_choice":
            self.line(_call(lhs, "route_expert_choice", [source, f"capacity_factor={r.capacity!r}",
                                                         f"score={r.score!r}", f"group_size={r.group_size!r}"]))
        elif r.kind == "dynamic_k":
            self.line(_call(lhs, "route_dynamic_k", [source, f"threshold={r.threshold!r}", f"k_min={r.k_min}",
                                                     f"k_max={r.k}", f"score={r.score!r}"]))
        elif r.kind == "soft":
            self.line(_call(lhs, "route_soft", [source, f"score={r.score!r}"]))
        elif r.kind == "deterministic":
            by = {"modality": [f"modality={source}"], "task": [f"task={source}"], "hash": [f"positions={positions}"]}[r.by]
            if r.by != "hash" and self.static:  # the static form checks no ids: no host sync
                by.append("validate=False")
            self.line(_call(lhs, "route_deterministic", [f"{source}.shape[0]", str(e), f"by={r.by!r}", *by]))
            if r.by != "hash" and not self.static:
                self.view.sync_notes.append(f"{r.by} id range check")
        elif r.kind == "group_limited":
            router = self.routers[self.group_of_path(path)]
            self.line(_call(lhs, "route_group_limited", [
                source, f"k={r.k}", f"num_groups={r.groups}", f"topk_groups={r.top_groups}",
                f"bias={router}.score_bias", f"scale={r.scale!r}", f"renormalize={r.renormalize}",
                f"score={r.score!r}"]))
            self.line(f"{router}.observe({', '.join([ids, *mask])})")
        else:  # pragma: no cover - the checker admits only the kinds above
            raise BackendError(f"no PyTorch lowering for router `{r.kind}`")

    def _value(self, value: float | O.ScheduleSpec, path: list[str], name: str) -> str:
        """A router setting: a literal, or the current value of a `Schedule` module (advanced by
        `model.after_step()`; its step is saved in the state dict)."""
        if not isinstance(value, O.ScheduleSpec):
            return repr(value)
        attr = self.module([*path[:-1], name], f"Schedule({value.kind!r}, start={value.start!r}, "
                                               f"end={value.end!r}, steps={value.steps})")
        return f"{attr}()"

    def _op_router_gate(self, node, op, ins, path):
        (logits,) = self.assign(node, ["logits"])
        self._gate(logits, path, op, ins[0], op.jitter, score_bias=self._feeds_group_limited(node))

    def _op_route(self, node, op, ins, path):
        positions = self._positions_of(node) if op.router.by == "hash" else None
        self._route(self.assign(node, ["weights", "expert_ids", "probs"]), ins[0], op.router, op.num_experts, path,
                    self.mask_arg(node), positions)

    def _positions_of(self, node: int) -> str:
        """The positions in their sequences (dim -2 of the block input) of the rows a route op reads:
        the key of hash routing, the same for a token whatever the batch around it."""
        base = f"{self.depth_route}.positions" if self.kept_tokens else "token_positions(x)"
        rows = self.g.inputs(node)[0]
        if self.g.op(rows.node).kind == "select_tokens" and not self.static:  # the group's rows
            return f"{base}.index_select(0, {self.names[self.g.outputs(rows.node)[1]]})"
        return base  # every row (the static form's groups too: their masks select)

    def _op_router(self, node, op, ins, path):
        shared = self._shared_gates(node)
        if len(shared) < 2:
            w, ids, probs, logits = self.assign(node, ["weights", "expert_ids", "probs", "logits"])
            self._gate(logits, path, op, ins[0], op.router.jitter, score_bias=op.router.kind == "group_limited")
        else:
            *outs, logits_value = self.g.outputs(node)
            w, ids, probs = self.assign_values(outs, ["weights", "expert_ids", "probs"], node)
            if node == shared[0]:
                self._shared_gate(shared, ins[0])
            logits = self.names[logits_value]
        self._route([w, ids, probs], logits, op.router, op.num_experts, path, self.mask_arg(node))

    def _shared_gates(self, node: int) -> list[int]:
        """The plain linear routers (no jitter, no balancing bias) of a merged MoE layer that read
        the same rows as `node`'s router, in emission order, if `node` is one of them: their
        logits come from one GEMM."""
        def plain(n: int) -> bool:
            op = self.g.op(n)
            return (op.kind == "router" and not op.router.jitter and not op.balance_rate
                    and op.router.kind != "group_limited")

        region = self.region(node)
        if region not in self.merged or not plain(node):
            return []
        def rows(n: int) -> Value:  # a merged group's selection passes every token through
            v = self.g.inputs(n)[0]
            return self.g.inputs(v.node)[0] if self.g.op(v.node).kind == "select_tokens" else v

        members = self._regions(self.g, self.nodes)[region]
        return [n for n in members if plain(n) and rows(n) == rows(node)]

    def _shared_gate(self, routers: list[int], x: str) -> None:
        """`a_logits, b_logits = router_logits(x, [self.a.router, self.b.router])`: the routers of
        modality groups that each score every token, as one GEMM over their stacked weights."""
        attrs, names = [], []
        for n in routers:
            op, path = self.g.op(n), self.rel(n)
            attrs.append(self.module(path, f"nn.Linear({op.dim}, {op.num_experts}, bias=False)"))
            self.routers[self.group_of_path(path)] = attrs[-1]
            self.names[self.g.outputs(n)[3]] = name = self.fresh(f"{self.group_of(n)}_logits")
            names.append(name)
        self.line(f"# the {len(routers)} groups' routers read the same rows: one GEMM")
        self.line(_call(", ".join(names), "router_logits", [x, "[" + ", ".join(attrs) + "]"]))

    def _op_mask_experts(self, node, op, ins, path):
        (ids,) = self.assign(node, ["computed_ids"])
        self.line(f"{ids} = mask_experts({ins[0]}, {op.num_experts})")

    def _op_identity_experts(self, node, op, ins, path):
        (y,) = self.assign(node, ["skip"])
        self.line(_call(y, "identity_experts", [*ins, f"first={op.first}", f"count={op.count}",
                                                *self.mask_arg(node)]))

    def mask_arg(self, node: int) -> list[str]:
        return []

    def _op_sort_by_expert(self, node, op, ins, path):
        (order,) = self.assign(node, ["order"])
        self.line(f"{order} = sort_by_expert({ins[0]}, {op.num_experts})")

    def _op_count_experts(self, node, op, ins, path):
        (counts,) = self.assign(node, ["counts"])
        self.line(f"{counts} = expert_counts({ins[0]}, {op.num_experts})")

    def _op_expert_offsets(self, node, op, ins, path):
        (offsets,) = self.assign(node, ["offsets"])
        self.line(f"{offsets} = expert_offsets({ins[0]})")

    def _op_permute(self, node, op, ins, path):
        mask = self.group_masks.get(self.group_of_path(path))
        if mask is not None:  # the merged call sorts every group's slots at once
            order, counts, offsets = self.g.outputs(node)
            self.names[order] = self.names[offsets] = "None"
            (name,) = self.assign_values([counts], ["counts"], node)
            self.line(f"{name} = expert_counts({ins[0]}, {op.num_experts}, token_mask={mask})")
            return
        # block_m pads segments for block-tiled kernels; a PyTorch grouped GEMM needs no padding
        outs = self.assign(node, ["order", "counts", "offsets"])
        self.line(f"{', '.join(outs)} = permute({ins[0]}, {op.num_experts})")

    def _op_gather_rows(self, node, op, ins, path):
        (rows,) = self.assign(node, ["rows"])
        k = str(self.g.type_of(self.g.inputs(node)[1]).shape[0]).rsplit("*", 1)[1]
        self.line(f"{rows} = gather_rows({ins[0]}, {ins[1]}, {k})")

    def _experts_module(self, path: list[str], gemm_like: O.OpBase, glu: bool, dim: int, hidden: int,
                        bias: bool) -> str:
        lora = getattr(gemm_like, "expert", gemm_like)  # fused_experts carries an ExpertSpec
        if lora.lora_rank is not None:
            on = f", adapted={lora.lora_on!r}" if lora.lora_on is not None else ""
            return self.module(path, f"LoRAExperts(num_experts={gemm_like.num_experts}, dim={dim}, hidden={hidden}, "
                                     f"glu={glu}, bias={bias}, rank={lora.lora_rank}, alpha={lora.lora_alpha!r}{on})")
        return self.module(path, f"Experts(num_experts={gemm_like.num_experts}, dim={dim}, hidden={hidden}, "
                                 f"glu={glu}, bias={bias})")

    def _op_expert_gemm(self, node, op, ins, path):
        glu = any(self.g.op(u).projection == "gate" for u, _ in self.g.users(self.g.inputs(node)[1])
                  if self.g.op(u).kind == "expert_gemm")
        dim, hidden = (op.in_dim, op.out_dim) if op.projection != "down" else (op.out_dim, op.in_dim)
        attr = self._experts_module(path[:-1], op, glu, dim, hidden, op.bias)
        (out,) = self.assign(node, [op.projection])
        bias = [f"{attr}.{op.projection}_bias"] if op.bias else []
        self.line(_call(out, "grouped_linear", [ins[0], _weight(attr, f"{op.projection}_proj", op.weights), ins[1],
                                                *bias]))
        self.view.sync_notes.append("segment sizes of an unfused grouped GEMM")

    def _op_activation(self, node, op, ins, path):
        (h,) = self.assign(node, ["hidden"])
        gate = [f"gate={ins[0]}"] if op.glu else []
        self.line(_call(h, "activate", [ins[-1], repr(op.act), *gate]))

    def _op_combine(self, node, op, ins, path):
        (y,) = self.assign(node, ["y"])
        self.line(f"{y} = combine({ins[0]}, {ins[1]}, {ins[2]})")

    def _op_fused_experts(self, node, op, ins, path):
        if self.expert_parallel:
            return self._experts_ep(node, op, ins, path)
        if self.region(node) in self.merged:
            return self._merged_experts(node, op, path)
        order, offsets = ins[3:]
        (y,) = self.assign(node, ["y"])
        e = op.expert
        if e.lora_rank is not None and e.weights != "ternary":  # adapters applied low-rank, never merged
            attr = self._experts_module(path, op, e.form == "glu", e.dim, e.hidden, e.bias)
            self.line(_call(y, "moe_lora_experts", [*ins[:3], attr, f"activation={e.act!r}", f"order={order}",
                                                    f"offsets={offsets}"]))
        else:
            self.line(_call(y, "moe_experts", [*self._expert_args(op, ins, path), f"order={order}",
                                               f"offsets={offsets}"]))
        from moec.backends.pytorch import runtime

        self.view.sync_notes += ["expert segment sizes"] * runtime.HOST_SYNCS["auto"]

    def _merged_experts(self, node, op, path):
        """The first group's experts run every group's: routings merged with group offsets, one
        call reading each group's stacked weights."""
        members = self._regions(self.g, self.nodes)[self.region(node)]
        groups = [n for n in members if self.g.op(n).kind == "fused_experts"]
        if node != groups[0]:
            self.names[self.g.outputs(node)[0]] = _MERGED
            return
        offsets, total, stacks, routing = [], 0, [], []
        for n in groups:
            g_path, g_op = self.rel(n), self.g.op(n)
            offsets.append(total)
            total += g_op.num_experts
            ids, w = (self.ref(v, n) for v in self.g.inputs(n)[1:3])
            routing.append((ids, w, self.group_masks[self.group_of_path(g_path)]))
            e = g_op.expert
            attr = self._experts_module(g_path, g_op, e.form == "glu", e.dim, e.hidden, e.bias)
            parts = [_weight(attr, "up_proj", e.weights), _weight(attr, "down_proj", e.weights),
                     _weight(attr, "gate_proj", e.weights) if e.form == "glu" else "None"]
            if e.bias:
                parts += [f"{attr}.up_bias", f"{attr}.down_bias", f"{attr}.gate_bias" if e.form == "glu" else "None"]
            stacks.append("(" + ", ".join(parts) + ")")
        ids, w = self.fresh("expert_ids"), self.fresh("weights")
        self.line(f"# the {len(groups)} groups' experts in one call: {total} experts, group offsets {offsets}")
        self.line(_call(f"{ids}, {w}", "merge_group_routing", [
            "[" + ", ".join(r[0] for r in routing) + "]", "[" + ", ".join(r[1] for r in routing) + "]",
            "[" + ", ".join(r[2] for r in routing) + "]", repr(offsets)]))
        self.names[self.g.outputs(node)[0]] = y = self.fresh("y")
        x = self.ref(self.g.inputs(node)[0], node)
        stack_list = "[" + "".join(f"\n                {st}," for st in stacks) + "\n            ]"
        self.line(_call(y, "moe_experts_groups", [x, ids, w, stack_list, f"activation={op.expert.act!r}"]))
        self.view.sync_notes.append("expert segment sizes")

    def _expert_args(self, op: O.FusedExpertsOp, ins: list[str], path: list[str]) -> list[str]:
        """Arguments shared by the fused expert calls: rows, routing, stacked weights, activation."""
        e = op.expert
        attr = self._experts_module(path, op, e.form == "glu", e.dim, e.hidden, e.bias)
        args = [*ins[:3], _weight(attr, "up_proj", e.weights), _weight(attr, "down_proj", e.weights)]
        if e.form == "glu":
            args.append(f"gate_proj={_weight(attr, 'gate_proj', e.weights)}")
        if e.bias:
            args += [f"up_bias={attr}.up_bias", f"down_bias={attr}.down_bias"]
            if e.form == "glu":
                args.append(f"gate_bias={attr}.gate_bias")
        return [*args, f"activation={e.act!r}"]

    def _experts_ep(self, node, op, ins, path):
        """This rank's experts of the group; tokens travel to their experts' ranks by all-to-all."""
        e, region = op.expert, path[0]
        if e.weights == "ternary" or e.lora_rank is not None:
            raise BackendError(f"{'ternary' if e.weights == 'ternary' else 'LoRA'} experts have no expert-parallel "
                               "form yet")
        if tuple(path) not in self.expert_start:  # (a chain's later iterations reuse the same experts)
            self.expert_start[tuple(path)] = self.expert_offset.get(region, 0)
            self.expert_offset[region] = self.expert_start[tuple(path)] + op.num_experts
        start = self.expert_start[tuple(path)]
        attr = self.module(path, f"ExpertParallelExperts.from_plan(ep['plan'], f'layers.{{layer}}.{region}', "
                                 f"ep['rank'], ep['world_size'], dim={e.dim}, hidden={e.hidden}, "
                                 f"glu={e.form == 'glu'}, bias={e.bias}, experts=({start}, {op.num_experts}))")
        (y,) = self.assign(node, ["y"])
        self.line(_call(y, "moe_experts_ep", [*ins[:3], attr, f"activation={e.act!r}", "group=self.ep_group"]))
        self.view.sync_notes.append("all-to-all split sizes")

    def masked_aux_loss(self, node, op, ins, mask: str | None) -> None:
        """A group's losses over the tokens of its mask (its router saw every token); no mask: all."""
        (aux,) = self.assign(node, ["aux"])
        token_mask = [f"token_mask={mask}"] if mask else []
        terms = []
        if op.losses.load_balance:
            call = ", ".join([ins[1], ins[2], str(op.num_experts), *token_mask])
            terms.append(f"{op.losses.load_balance!r} * load_balance_loss_static({call})")
        if op.losses.z_loss:
            terms.append(f"{op.losses.z_loss!r} * z_loss_static({', '.join([ins[0], *token_mask])})")
        self.line(f"{aux} = (\n            " + "\n            + ".join(terms) + "\n        )")

    def _op_aux_loss(self, node, op, ins, path):
        mask = self.group_masks.get(self.group_of_path(path))
        if mask is not None:
            return self.masked_aux_loss(node, op, ins, mask)
        (aux,) = self.assign(node, ["aux"])
        terms = []
        if op.losses.load_balance:
            terms.append(f"{op.losses.load_balance!r} * load_balance_loss({ins[1]}, {ins[2]}, {op.num_experts})")
        if op.losses.z_loss:
            terms.append(f"{op.losses.z_loss!r} * z_loss({ins[0]})")
        self.line(f"{aux} = {' + '.join(terms)}" if len(terms) < 2 or sum(map(len, terms)) < 80
                  else f"{aux} = (\n            " + "\n            + ".join(terms) + "\n        )")


class _StaticBlockEmitter(_BlockEmitter):
    """Static-shape form (`--static`): every group sees all T tokens under a modality mask and
    dispatches into capacity-padded [E, C, d] buffers, so no shape depends on data (no host sync,
    no nonzero, no sort): what torch.export and torch-mlir need."""

    merges_groups = False
    static = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks: dict[str | None, str] = {}  # group (None: ungrouped) -> its token mask

    def mask_arg(self, node: int) -> list[str]:
        mask = self.masks.get(self.group_of(node))
        return [f"token_mask={mask}"] if mask else []

    def modality_rows(self, ids_name: str, op: O.OpBase) -> str:
        """Per-modality copies get each modality's token mask (rows would have data-dependent sizes)."""
        key = (ids_name, op.per_modality)
        if key not in self.rows_of_modalities:
            self.rows_of_modalities[key] = name = self.fresh("masks")
            self.line(f"{name} = modality_masks({ids_name}, {tuple(op.per_modality)!r})")
        return self.rows_of_modalities[key]

    def _op_select_tokens(self, node, op, ins, path):
        xs, idx = self.g.outputs(node)
        self.names[xs] = ins[0]  # the group reads all tokens; its mask says which are its own
        if (ins[1], op.modalities) in self.selections:  # the same tokens again (a group's router state)
            self.names[idx] = self.selections[(ins[1], op.modalities)]
            return
        mask = self.fresh(f"{self.group_of(node)}_mask")
        self.names[idx] = mask
        self.masks[self.group_of(node)] = mask
        self.selections[(ins[1], op.modalities)] = mask
        kept = f" & {self.masks[None]}" if self.masks.get(None) else ""  # in a masked depth block
        self.line(f"{mask} = token_mask_for({ins[1]}, {tuple(op.modalities)!r}){kept}")

    def _op_scatter_tokens(self, node, op, ins, path):
        self.names[self.g.outputs(node)[0]] = ins[0]  # already [T, d], zero outside the mask

    def _op_router(self, node, op, ins, path):
        self._check_group_routing(node, op.router)
        super()._op_router(node, op, ins, path)

    def _op_route(self, node, op, ins, path):
        self._check_group_routing(node, op.router)
        super()._op_route(node, op, ins, path)

    def _check_group_routing(self, node: int, r: O.RouterSpec) -> None:
        """Masked groups see all T tokens: routers whose choices depend on the group's token count
        (expert capacity) would rank the other modalities' tokens too."""
        group = self.group_of(node)
        if self.masks.get(group) and (r.kind == "expert_choice" or r.capacity is not None):
            what = "expert_choice routing" if r.kind == "expert_choice" else "a top_k capacity"
            where = ("a modality group (the capacity depends on the group's token count)" if group else
                     "a Mixture-of-Depths block over some modalities (the capacity depends on how many "
                     "tokens the block keeps)")
            raise BackendError(f"the static form does not support {what} inside {where}; use the dynamic form")

    def _op_permute(self, node, op, ins, path):
        order, counts, offsets = self.g.outputs(node)
        self.names[order] = self.names[offsets] = "None"  # the static dispatch needs no sort
        if not self.g.users(counts):  # counted elsewhere (zero-computation experts count all routed ids)
            return
        (name,) = self.assign_values([counts], ["counts"], node)
        self.line(_call(name, "expert_counts_static", [ins[0], str(op.num_experts), *self.mask_arg(node)]))

    def _op_fused_experts(self, node, op, ins, path):
        (y,) = self.assign(node, ["y"])
        self.line(_call(y, "moe_experts_static", [*self._expert_args(op, ins, path), *self.mask_arg(node)]))

    def _op_aux_loss(self, node, op, ins, path):
        self.masked_aux_loss(node, op, ins, self.masks.get(self.group_of(node)))

    def _op_count_experts(self, node, op, ins, path):
        if any(self.g.op(u).kind == "expert_offsets" for u, _ in self.g.users(self.g.outputs(node)[0])):
            return self._unfused(node, op, ins, path)
        (counts,) = self.assign(node, ["counts"])  # counts of all routed experts, zero-computation ones too
        self.line(_call(counts, "expert_counts_static", [ins[0], str(op.num_experts), *self.mask_arg(node)]))

    def _unfused(self, node, op, ins, path):
        raise BackendError("the static form needs the fused pipeline (drop --pipeline unfused)")

    def _op_depth_route(self, node, op, ins, path):
        super()._op_depth_route(node, op, ins, path)
        if op.modalities:  # every token goes through the block; MoE layers count only the kept ones
            self.masks[None] = f"{self.depth_route}.kept"

    def _op_depth_combine(self, node, op, ins, path):
        super()._op_depth_combine(node, op, ins, path)
        self.masks.pop(None, None)

    _op_sort_by_expert = _op_expert_offsets = _unfused
    _op_gather_rows = _op_expert_gemm = _op_activation = _op_combine = _unfused


def _ctor(sub, indent: int = 8, used: int = 0) -> str:
    """Constructor text of a submodule (`used`: the columns before it on its first line); nested
    namespaces become indented Container(...) calls; a call too long for one line gets its
    arguments on the next."""
    if isinstance(sub, str):
        return _fit(sub, indent, used)
    pad = " " * (indent + 4)
    items = "".join(f"\n{pad}{k}={_ctor(v, indent + 4, indent + 4 + len(k) + 1)}," for k, v in sub.items())
    return f"Container({items}\n{' ' * indent})"


def _fit(call: str, indent: int, used: int, width: int = 110) -> str:
    """`call` as is if it fits in `width` columns after `used`; else `f(` with its arguments on
    the following line(s) at indent + 4 and `)` back at indent."""
    if "\n" in call or used + len(call) + 1 <= width or "(" not in call or not call.endswith(")"):
        return call
    head, inner = call.split("(", 1)
    args, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(inner[:-1]):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
    args.append(inner[start:-1].strip())
    pad = " " * (indent + 4)
    lines, line = [], ""
    for arg in args:
        if line and len(pad) + len(line) + len(arg) + 2 > width:
            lines.append(line)
            line = ""
        line = f"{line} {arg}," if line else f"{arg},"
    lines.append(line)
    return f"{head}(\n" + "".join(f"{pad}{text}\n" for text in lines) + f"{' ' * indent})"


def emit_blocks(graph: Graph, emit) -> tuple[dict[str, BlockView], list[LayerCall]]:
    """One class per block kind: `emit(nodes, view)` fills the view from the first layer of each
    kind. Returns the views by block key and how to construct every layer, in order."""
    by_layer: dict[int, list[int]] = {}
    for n in graph.nodes():
        if graph.op(n).layer is not None:
            by_layer.setdefault(graph.op(n).layer, []).append(n)
    blocks: dict[str, BlockView] = {}
    layer_calls: list[LayerCall] = []
    used_class_names: set[str] = set()
    for i in sorted(by_layer):
        first = by_layer[i][0]
        key = graph.op(first).block
        if key not in blocks:
            cname = _class_name(key)
            while cname in used_class_names:
                cname += "_"
            used_class_names.add(cname)
            loc = graph.op(first).loc
            view = BlockView(name=key, class_name=cname, loc=f"{os.path.basename(loc.path)}:{loc.line}" if loc else "?")
            emit(by_layer[i], view)
            blocks[key] = view
        ratios = [graph.op(n).ratio for n in by_layer[i] if graph.op(n).kind == "depth_route"]
        layer_calls.append(LayerCall(blocks[key].class_name, ", ".join(f"ratio={r!r}" for r in ratios)))
    return blocks, layer_calls


def render(graph: Graph, source: str, static: bool = False, plan: dict | None = None) -> str:
    """The generated module's source; `static=True` gives the static-shape export form; a
    placement `plan` gives the expert-parallel form (each rank holds its experts)."""
    if plan is not None and static:
        raise BackendError("the expert-parallel form has no static variant")
    if plan is not None and graph.find("expert_gemm"):
        raise BackendError("the expert-parallel form needs the fused pipeline (drop --pipeline unfused)")
    emitter = _StaticBlockEmitter if static else _BlockEmitter
    inp = graph.op(graph.find("input")[0])
    blocks, layers = emit_blocks(
        graph, lambda nodes, view: emitter(graph, nodes, view, expert_parallel=plan is not None).emit())
    if plan is not None:  # after the blocks, which name the features the form lacks
        try:
            check_plan(plan, graph)
        except PlacementError as exc:
            raise BackendError(f"placement plan: {exc}") from None
    final = [n for n in graph.find("norm") if graph.op(n).layer is None]
    env = jinja2.Environment(loader=jinja2.FunctionLoader(_template), trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    per_layer = {b.class_name: b.host_syncs for b in blocks.values()}
    final_norm = _norm_ctor(graph.op(final[0])) if final else None
    text = "\n".join([line for b in blocks.values() for line in b.body + [b.returns] + [m.ctor for m in b.modules]]
                     + [final_norm or ""])
    used = {"ModelOutput", "check_modality"} | set(re.findall(r"\b([A-Za-z_]\w*)[.(]", text))
    imports = [(module, sorted((n for n in names if n in used), key=lambda n: (n[0].islower(), n)))
               for module, (_, names) in RUNTIME_MODULES.items()]
    return env.get_template("model.py.j2").render(
        imports=sorted((m, names) for m, names in imports if names), static=static,
        plan=_plan_literal(plan) if plan is not None else None,
        uses_task=any(graph.op(n).kind == "route" and graph.op(n).router.by == "task" for n in graph.nodes())
        or any(graph.op(n).kind == "router" and graph.op(n).router.by == "task" for n in graph.nodes()),
        version=__version__, source=source, model_name=graph.name, modalities=inp.modalities,
        modalities_tuple=repr(tuple(inp.modalities)), d_model=inp.dim, blocks=list(blocks.values()),
        layers=layers, final_norm=final_norm,
        router_cell=router_cell(graph), total_syncs=sum(per_layer[layer.cls] for layer in layers))


def router_cell(graph: Graph) -> str | None:
    """Constructor of a recurrent router's GRU cell (one per model, shared by every MoE layer), or None."""
    cells = {(op.cell, op.projection, op.hidden) for op in map(graph.op, graph.find("router_state"))}
    if not cells:
        return None
    if len(cells) > 1:  # the checker requires one size; a hand-built graph might not
        raise BackendError(f"recurrent routers of different sizes share one cell: {sorted(cells)}")
    ((cell, projection, hidden),) = cells
    if cell != "gru":  # pragma: no cover - the checker admits only gru
        raise BackendError(f"no PyTorch lowering for the recurrent cell `{cell}`")
    return f"nn.GRUCell({projection}, {hidden})"


def _template(name: str) -> str:
    return resources.files("moec.backends.pytorch").joinpath("templates", name).read_text()


def _plan_literal(plan: dict) -> str:
    """The part of a placement plan the generated module needs, as a Python literal."""
    keep = {"num_devices": plan["num_devices"],
            "layers": [{"name": layer["name"], "phy2log": layer["phy2log"]} for layer in plan["layers"]]}
    return repr(keep)


def runtime_files() -> dict[str, str]:
    """File name -> source of every runtime module a generated model may import."""
    pkg = resources.files("moec.backends.pytorch")
    return {f"{module}.py": pkg.joinpath(src).read_text() for module, (src, _) in RUNTIME_MODULES.items()}
