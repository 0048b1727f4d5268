"""analyze: parameters, active parameters, FLOPs and activation bytes per token, per modality.

Conventions (also printed by `moec report`):
- FLOPs = 2 x multiply-accumulates of the weight GEMMs (projections, router gates, experts) for
  one token in the forward pass. Attention's QK^T and AV products grow with the context length and
  are not included; norms, activations, softmax and top-k are not counted either.
- Active parameters of a token: the weights its forward pass reads (k routed experts of its
  modality's group, the router, shared experts, attention, norms); a chain of experts counts
  every iteration's k experts.
- A recurrent router (RMoE) adds per MoE layer its projection (dim x projection) and the GRU
  cell's GEMMs (3 x hidden x (projection + hidden)) to the FLOPs and active parameters; the cell is
  shared, so its parameters count once (in the first MoE layer).
- Activation bytes per token: the elements of every value the token produces in the forward pass
  (the permuted expert rows count k times), times 4 bytes (fp32).
- Mixture-of-Depths: a block's costs for a candidate token are the expected ones, ratio x the
  block's (the depth router's scores are computed for every token).
Parameters and FLOPs are the same before and after lower-moe; activation bytes need the lowered
graph (an unlowered `moe` op only shows its output).
"""

from __future__ import annotations

import math
from collections import defaultdict

from moec import ops as O
from moec.ir import Graph, TensorType

from .manager import Pass, PassContext


def _per_token_elements(t: TensorType) -> int:
    if not t.shape:
        return 0
    n = 1
    for s in t.shape[1:]:
        n *= s if isinstance(s, int) else 1
    lead = t.shape[0]
    if isinstance(lead, str) and "*" in lead:
        n *= int(lead.rsplit("*", 1)[1])
    return n


REFERENCE_TOKENS = 1000  # tokens per group for the padding estimates (not a power of two, as real batches)
REFERENCE_BLOCKS = (16, 64, 128)

# Launches an unfused lowering needs for what one op of the current graph does.
_UNFUSED_LAUNCHES = {"router": 2, "permute": 3}


def _unfused_launches(op: O.OpBase) -> int:
    if op.kind == "fused_experts":
        return 6 if op.expert.form == "glu" else 5  # gather, up, [gate], activation, down, combine
    return _UNFUSED_LAUNCHES.get(op.kind, 1)


def _int(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def _router_of(graph: Graph, node: int) -> O.OpBase:
    """The route/router op whose expert ids feed a gather/GEMM/fused op."""
    n = node
    while graph.op(n).kind not in ("route", "router"):
        op = graph.op(n)
        port = {"fused_experts": 1, "gather_rows": 1, "expert_gemm": 1, "combine": 2}.get(op.kind, 0)
        n = graph.inputs(n)[port].node
    return graph.op(n)


def _k_of(graph: Graph, node: int, computed: int) -> float:
    """Expected computed experts per token of the routing feeding a gather/GEMM/fused op over
    `computed` experts (zero-computation experts take their uniform share of the slots)."""
    r = _router_of(graph, node)
    expected, _, _ = r.router.experts_per_token(r.num_experts)
    return expected * computed / r.num_experts


def _num_experts(op: O.OpBase, graph: Graph, node: int) -> int:
    if op.kind == "fused_experts":
        return op.num_experts
    return graph.op(graph.inputs(node)[1].node).num_experts  # gather <- sort_by_expert / permute


def _block_m(graph: Graph, node: int) -> int:
    order = graph.op(graph.inputs(node)[3 if graph.op(node).kind == "fused_experts" else 1].node)
    return getattr(order, "block_m", 1)


def padded_rows(counts: list[int], block_m: int) -> int:
    """Rows after padding every non-empty expert segment to a multiple of block_m."""
    return sum(-(-c // block_m) * block_m for c in counts)


def _fusion_report(e: dict) -> dict:
    """Per MoE layer: what fusion saves, and what block alignment costs (per group, summed)."""
    gather_unfused = sum(g["k"] * g["dim"] * 4 for g in e["groups"])
    gather_fused = sum(g["k"] * 8 for g in e["groups"])
    blocks = sorted({*REFERENCE_BLOCKS, *(g["block_m"] for g in e["groups"])})
    padding = {}
    for b in blocks:
        uniform = skewed = rows = worst = 0
        for g in e["groups"]:
            n, E, k = REFERENCE_TOKENS * g["k"], g["experts"], g["k"]
            q, r = divmod(n, E)  # uniform: r experts get q + 1 rows, the others q
            uniform += r * padded_rows([q + 1], b) + (E - r) * padded_rows([q], b)
            skewed += k * padded_rows([REFERENCE_TOKENS], b)  # every token to the same k experts
            rows += n
            worst += n + E * (b - 1)
        padding[str(b)] = {"uniform": uniform / rows - 1, "skewed": skewed / rows - 1, "worst_case_rows": worst}
    return {"kernel_launches": e["launches"], "kernel_launches_unfused": e["launches_unfused"],
            "permuted_copy_bytes_per_token": gather_unfused, "index_bytes_per_token": gather_fused,
            "block_m": max(g["block_m"] for g in e["groups"]),
            "padding_overhead_at_tokens": REFERENCE_TOKENS, "padding_overhead": padding}


def _ternary_matrix_params(op: O.OpBase) -> int:
    """Weight-matrix entries stored as {-1, 0, 1} (biases and per-expert scales stay full precision)."""
    def matrices(e: O.ExpertSpec, copies: int) -> int:
        return copies * (3 if e.form == "glu" else 2) * e.dim * e.hidden if e.weights == "ternary" else 0

    if op.kind == "expert_gemm":
        return op.num_experts * op.in_dim * op.out_dim if op.weights == "ternary" else 0
    if op.kind == "fused_experts":
        return matrices(op.expert, op.num_experts)
    if op.kind == "ffn":
        return matrices(op.expert, 1)
    if op.kind == "moe":
        total = matrices(op.shared.widened(op.num_shared), 1) if op.shared else 0
        for g in op.groups:
            total += matrices(g.expert, g.num_experts)
            total += matrices(g.shared.widened(g.num_shared), 1) if g.shared else 0
        return total
    return 0


def _cost(graph: Graph, node: int, op: O.OpBase) -> tuple[int, int, int]:
    """(parameters, active parameters per token, forward FLOPs per token) of one op; a
    per-modality op (Mixture-of-Transformers) holds a copy per modality, a token uses one."""
    p, active, flops = _single_cost(graph, node, op)
    return p * max(1, len(getattr(op, "per_modality", ()))), active, flops


def _single_cost(graph: Graph, node: int, op: O.OpBase) -> tuple[int, int, int]:
    k = op.kind
    if k == "norm":
        p = op.dim * (2 if op.norm == "layer" else 1)
        return p, p, 0
    if k == "attention":
        w = op.dim * op.head_dim * (2 * op.heads + 2 * op.kv_heads)
        b = (op.heads + 2 * op.kv_heads) * op.head_dim if op.bias else 0
        b += op.dim if op.o_bias else 0
        qk = {"none": 0, "head": 2 * op.head_dim, "projection": (op.heads + op.kv_heads) * op.head_dim}[op.qk_norm]
        if op.routed_heads is None:
            return w + b + qk, w + b + qk, 2 * w
        # Mixture-of-heads: a token's Q and O use its shared + routed heads; K and V serve every
        # token, so they stay whole; the head routers add their gates.
        routers = op.dim * (op.heads - op.shared_heads) + (op.dim * (op.shared_heads + 2) if op.shared_heads else 0)
        active_w = op.dim * op.head_dim * (2 * (op.shared_heads + op.routed_heads) + 2 * op.kv_heads)
        return w + b + qk + routers, active_w + b + qk + routers, 2 * (active_w + routers)
    if k == "attention_experts":
        # Attention experts: E query / output projection pairs, one token uses its top_k of them;
        # the shared K and V projections serve every token; plus the router gate.
        qo = 2 * op.dim * op.heads * op.head_dim
        kv = 2 * op.dim * op.kv_heads * op.head_dim
        router = op.dim * op.num_experts
        qk = {"none": 0, "head": 2 * op.head_dim, "projection": (op.heads + op.kv_heads) * op.head_dim}[op.qk_norm]
        b_kv = 2 * op.kv_heads * op.head_dim if op.bias else 0
        b_qo = (op.heads * op.head_dim if op.bias else 0) + (op.dim if op.o_bias else 0)  # per expert
        params = op.num_experts * (qo + b_qo) + kv + b_kv + router + qk
        active = op.top_k * (qo + b_qo) + kv + b_kv + router + qk
        return params, active, 2 * (op.top_k * qo + kv + router)
    if k == "latent_attention":
        return op.params, op.params, op.flops
    if k == "router_state":  # the layer's projection and the (shared) GRU cell; Analyze counts the cell once
        p = op.projection_params + op.cell_params
        return p, p, op.flops
    if k == "ffn":
        gate = op.expert.dim if op.gate != "none" else 0
        return op.expert.params + gate, op.expert.params + gate, op.expert.flops + 2 * gate
    if k == "depth_route":
        return op.dim, op.dim, 2 * op.dim
    if k in ("router_gate", "router"):
        p = op.dim * op.num_experts
        return p, p, 2 * p
    if k == "expert_gemm":
        per = op.in_dim * op.out_dim + (op.out_dim if op.bias else 0)
        top = _k_of(graph, node, op.num_experts)
        if op.lora_rank is not None:  # one frozen base matrix + an adapter (A [in, r], B [r, out]) per expert
            adapter = op.lora_rank * (op.in_dim + op.out_dim) if op.adapted else 0
            return (per + op.num_experts * adapter, _int(per + top * adapter),
                    _int(2 * top * (op.in_dim * op.out_dim + adapter)))
        return op.num_experts * per, _int(top * per), _int(2 * top * op.in_dim * op.out_dim)
    if k == "fused_experts":
        top = _k_of(graph, node, op.num_experts)
        return _experts_cost(op.expert, op.num_experts, top)
    return 0, 0, 0


def _experts_cost(e: O.ExpertSpec, num_experts: int, top: float) -> tuple[int, int | float, int | float]:
    """(parameters, active parameters, FLOPs) per token of a routed pool using `top` experts per token;
    LoRA experts share one frozen base and differ by their adapters."""
    if e.lora_rank is None:
        return num_experts * e.params, _int(top * e.params), _int(top * e.flops)
    a = e.adapter_params
    return e.params + num_experts * a, _int(e.params + top * a), _int(top * (e.flops + 2 * a))


def _moe_costs(op: O.MoEOp, modalities: tuple[str, ...]) -> tuple[int, dict[str, int], dict[str, int]]:
    gate = op.dim if op.shared and op.shared_gate != "none" else 0  # the shared experts' output gate
    shared_p = op.shared.widened(op.num_shared).params + gate if op.shared else 0
    shared_f = op.shared.widened(op.num_shared).flops + 2 * gate if op.shared else 0
    params = shared_p
    active: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    c = op.iterations  # a chain runs routers and experts c times (new routers, the same experts)
    gate_dim = op.recurrent.hidden if op.recurrent is not None else op.dim  # a recurrent gate reads the state
    for g in op.groups:  # a token's cost sums over every group it belongs to
        gate = gate_dim * g.routed_experts if g.router.learned else 0
        per_token, _, _ = g.router.experts_per_token(g.routed_experts)
        computed = per_token * g.num_experts / g.routed_experts  # zero-computation experts are free
        sp = g.shared.widened(g.num_shared).params if g.shared else 0
        sf = g.shared.widened(g.num_shared).flops if g.shared else 0
        pool_params, pool_active, pool_flops = _experts_cost(g.expert, g.num_experts, computed)
        params += c * gate + pool_params + sp
        for i in g.modalities:
            active[modalities[i]] += c * (gate + pool_active + sp)
            flops[modalities[i]] += c * (2 * gate + pool_flops + sf)
    return (params, {m: _int(v + c * shared_p) for m, v in active.items()},
            {m: _int(v + c * shared_f) for m, v in flops.items()})


class Analyze(Pass):
    name = "analyze"
    description = "count parameters, active parameters, FLOPs and activation bytes per token per modality"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        inp = graph.op(graph.find("input")[0])
        mods = inp.input_modalities
        layers: dict[int | None, dict] = {}
        ternary_matrices = 0
        weights_seen: set[str] = set()
        depth: dict[int, tuple[float, tuple[str, ...]]] = {}  # layer -> kept ratio, candidate modalities
        recurrent: dict | None = None  # a recurrent router's cell, projections and FLOPs over all layers

        def entry(layer):
            if layer not in layers:
                layers[layer] = {"params": 0, "active": defaultdict(int), "flops": defaultdict(int),
                                 "bytes": defaultdict(int), "moe": False, "block": None, "launches": 0,
                                 "launches_unfused": 0, "groups": [], "routing": []}
            return layers[layer]

        for node in graph.nodes():
            op = graph.op(node)
            e = entry(op.layer)
            e["block"] = op.block
            e["moe"] = e["moe"] or op.kind in ("moe", "router_gate", "router", "route", "attention_experts")
            types = graph.types(node) or ()
            token_mods = types[0].modalities if types and types[0].modalities else mods
            if op.kind == "depth_route":
                candidates = tuple(inp.modalities[i] for i in op.modalities) or mods
                depth[op.layer] = (op.ratio, candidates)
                e["depth"] = {"ratio": op.ratio, "modalities": [m for m in candidates if m in mods], "causal": False}
            ratio, candidates = depth.get(op.layer, (1.0, ()))

            def share(m: str, kind=op.kind, ratio=ratio, candidates=candidates) -> float:
                """The fraction of a token of modality m that goes through this op."""
                inside = kind not in ("depth_route", "depth_combine")
                return ratio if inside and m in candidates else 1.0

            for t in types:
                for m in (t.modalities or ()):
                    e["bytes"][m] += _int(share(m) * 4 * _per_token_elements(t))
            p, active, f = _cost(graph, node, op)
            if op.kind in ("fused_experts", "expert_gemm", "ffn"):  # a chain's iterations share their experts
                if op.name in weights_seen:
                    p = 0
                weights_seen.add(op.name)
            if op.kind == "router_state":  # one GRU cell serves every MoE layer: its parameters count once
                recurrent = recurrent or {"cell": op.cell, "hidden": op.hidden, "projection": op.projection,
                                          "cell_params": op.cell_params, "projection_params": 0, "layers": 0,
                                          "flops_per_token": 0}
                p -= op.cell_params if recurrent["layers"] else 0
                recurrent["projection_params"] += op.projection_params
                recurrent["layers"] += 1
                recurrent["flops_per_token"] += op.flops
            ternary_matrices += _ternary_matrix_params(op) if p else 0
            if op.kind == "moe":
                p_total, act_m, flops_m = _moe_costs(op, inp.modalities)
                e["params"] += p_total
                for m in mods:
                    e["active"][m] += _int(share(m) * act_m.get(m, 0))
                    e["flops"][m] += _int(share(m) * flops_m.get(m, 0))
            else:
                e["params"] += p
                for m in token_mods:
                    e["active"][m] += _int(share(m) * active)
                    e["flops"][m] += _int(share(m) * f)
            if op.kind not in ("input", "output"):
                e["launches"] += 1
                e["launches_unfused"] += _unfused_launches(op)
            if op.kind == "attention_experts":
                e["routing"].append({"router": "top_k", "of": "attention experts", "experts_per_token": {
                    "expected": op.top_k, "min": op.top_k, "max": op.top_k}, "causal": True})
            if op.kind in ("gather_rows", "fused_experts"):
                r = _router_of(graph, node)
                expected, lo, hi = r.router.experts_per_token(r.num_experts)
                e["routing"].append({"router": r.router.kind, "experts_per_token": {
                    "expected": _int(expected), "min": lo, "max": hi}, "causal": r.router.kind != "expert_choice"})
                e["groups"].append({"experts": _num_experts(op, graph, node), "k": r.router.slots(r.num_experts),
                                    "dim": graph.type_of(graph.inputs(node)[0]).shape[-1],
                                    "block_m": _block_m(graph, node)})

        def finish(e: dict) -> dict:
            return {"params": e["params"],
                    "active_params_per_token": {m: e["active"][m] for m in mods},
                    "flops_per_token": {m: e["flops"][m] for m in mods},
                    "activation_bytes_per_token": {m: e["bytes"][m] for m in mods}}

        per_layer = []
        for idx in sorted(k for k in layers if k is not None):
            e = layers[idx]
            kind = "moe" if e["moe"] else "dense"
            row = {"index": idx, "block": e["block"], "kind": kind, **finish(e)}
            if e["groups"]:
                row["fusion"] = _fusion_report(e)
            if e["routing"]:
                row["routing"] = e["routing"]
            if "depth" in e:
                row["depth"] = e["depth"]
            per_layer.append(row)
        total = {"params": sum(e["params"] for e in layers.values()),
                 "active": {m: sum(e["active"][m] for e in layers.values()) for m in mods},
                 "flops": {m: sum(e["flops"][m] for e in layers.values()) for m in mods},
                 "bytes": {m: sum(e["bytes"][m] for e in layers.values()) for m in mods}}
        ctx.results["analysis"] = {
            "model": graph.name,
            "modalities": list(mods),
            "params": {"total": total["params"], "active_per_token": total["active"]},
            "flops_per_token": total["flops"],
            "activation_bytes_per_token": total["bytes"],
            "layers": per_layer,
        }
        if recurrent is not None:
            ctx.results["analysis"]["recurrent_router"] = recurrent
        if ternary_matrices:
            ctx.results["analysis"]["ternary_weights"] = {
                "params": ternary_matrices,
                "bytes_16bit": 2 * ternary_matrices,
                "bytes_2bit_packed": ternary_matrices // 4 + (ternary_matrices % 4 > 0),
                "bytes_log2_3_bound": round(ternary_matrices * math.log2(3) / 8),
            }
        return False
