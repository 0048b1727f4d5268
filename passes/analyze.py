"""analyze: parameters, active parameters, FLOPs and activation bytes per token, per modality.

Conventions (also printed by `moec report`):
- FLOPs = 2 x multiply-accumulates of the weight GEMMs (projections, router gates, experts) for
  one token in the forward pass. Attention's QK^T and AV products grow with the context length and
  are not included; norms, activations, softmax and top-k are not counted either.
- Active parameters of a token: the weights its forward pass reads (k routed experts of its
  modality's group, the router, shared experts, attention, norms).
- Activation bytes per token: the elements of every value the token produces in the forward pass
  (the permuted expert rows count k times), times 4 bytes (fp32).
Parameters and FLOPs are the same before and after lower-moe; activation bytes need the lowered
graph (an unlowered `moe` op only shows its output).
"""

from __future__ import annotations

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


def _moe_costs(op: O.MoEOp, modalities: tuple[str, ...]) -> tuple[int, dict[str, int], dict[str, int]]:
    params, active, flops = 0, {}, {}
    shared_p = op.shared.widened(op.num_shared).params if op.shared else 0
    shared_f = op.shared.widened(op.num_shared).flops if op.shared else 0
    params += shared_p
    for g in op.groups:
        gp = op.dim * g.num_experts + g.num_experts * g.expert.params
        sp = g.shared.widened(g.num_shared).params if g.shared else 0
        sf = g.shared.widened(g.num_shared).flops if g.shared else 0
        params += gp + sp
        for i in g.modalities:
            m = modalities[i]
            active[m] = op.dim * g.num_experts + g.router.k * g.expert.params + sp + shared_p
            flops[m] = 2 * op.dim * g.num_experts + g.router.k * g.expert.flops + sf + shared_f
    return params, active, flops


class Analyze(Pass):
    name = "analyze"
    description = "count parameters, active parameters, FLOPs and activation bytes per token per modality"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        inp = graph.op(graph.find("input")[0])
        mods = inp.input_modalities
        layers: dict[int | None, dict] = {}

        def entry(layer):
            if layer not in layers:
                layers[layer] = {"params": 0, "active": defaultdict(int), "flops": defaultdict(int),
                                 "bytes": defaultdict(int), "moe": False, "block": None}
            return layers[layer]

        for node in graph.nodes():
            op = graph.op(node)
            e = entry(op.layer)
            e["block"] = op.block
            e["moe"] = e["moe"] or op.kind in ("moe", "router_gate")
            types = graph.types(node) or ()
            token_mods = types[0].modalities if types and types[0].modalities else mods
            for t in types:
                for m in (t.modalities or ()):
                    e["bytes"][m] += 4 * _per_token_elements(t)
            p, f = 0, 0
            if op.kind == "norm":
                p = op.dim * (2 if op.norm == "layer" else 1)
            elif op.kind == "attention":
                w = op.dim * op.head_dim * (2 * op.heads + 2 * op.kv_heads)
                b = (op.heads + 2 * op.kv_heads) * op.head_dim + op.dim if op.bias else 0
                p, f = w + b, 2 * w
            elif op.kind == "ffn":
                p, f = op.expert.params, op.expert.flops
            elif op.kind == "router_gate":
                p, f = op.dim * op.num_experts, 2 * op.dim * op.num_experts
            elif op.kind == "expert_gemm":
                k = graph.type_of(graph.inputs(graph.inputs(node)[1].node)[0]).shape[1]
                per = op.in_dim * op.out_dim + (op.out_dim if op.bias else 0)
                e["params"] += op.num_experts * per
                for m in token_mods:
                    e["active"][m] += k * per
                    e["flops"][m] += 2 * k * op.in_dim * op.out_dim
                continue
            elif op.kind == "moe":
                p_total, active, flops = _moe_costs(op, inp.modalities)
                e["params"] += p_total
                for m, v in active.items():
                    e["active"][m] += v
                for m, v in flops.items():
                    e["flops"][m] += v
                continue
            e["params"] += p
            for m in token_mods:
                e["active"][m] += p
                e["flops"][m] += f

        def finish(e: dict) -> dict:
            return {"params": e["params"],
                    "active_params_per_token": {m: e["active"][m] for m in mods},
                    "flops_per_token": {m: e["flops"][m] for m in mods},
                    "activation_bytes_per_token": {m: e["bytes"][m] for m in mods}}

        per_layer = []
        for idx in sorted(k for k in layers if k is not None):
            e = layers[idx]
            kind = "moe" if e["moe"] else "dense"
            per_layer.append({"index": idx, "block": e["block"], "kind": kind, **finish(e)})
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
        return False
