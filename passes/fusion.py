"""Fusion passes: IR -> IR rewrites that merge lowered MoE primitives. Numerics never change.

- fuse-router:      router_gate + route                        -> router
- fuse-permute:     sort_by_expert + count_experts + expert_offsets -> permute {block_m}
- fuse-expert-gemm: gather_rows + expert_gemm (up/gate) + activation + expert_gemm (down)
                    + combine                                  -> fused_experts
"""

from __future__ import annotations

from moec import ops as O
from moec.ir import Graph, Value

from .infer_shapes import InferShapes
from .manager import Pass, PassContext


def _users(g: Graph, v: Value) -> list[int]:
    return [n for n, _ in g.users(v)]


def _producer(g: Graph, node: int, port: int) -> int:
    return g.inputs(node)[port].node


def _common(op: O.OpBase) -> dict:
    return {"layer": op.layer, "block": op.block, "loc": op.loc}


class FuseRouter(Pass):
    name = "fuse-router"
    description = "merge the gate GEMM, score function and top-k of each router into one `router` op"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for top in graph.find("route"):
            gate = _producer(graph, top, 0)
            if graph.op(gate).kind != "router_gate":
                continue
            g_op, t_op = graph.op(gate), graph.op(top)
            name = g_op.name  # keeps the module path of the gate weights
            node = graph.add(O.RouterOp(name=name, dim=g_op.dim, num_experts=g_op.num_experts, router=t_op.router,
                                        balance_rate=g_op.balance_rate,
                                        **_common(g_op)), graph.inputs(gate), num_outputs=4, replaces=gate)
            weights, ids, probs, logits = graph.outputs(node)
            for old, new in zip(graph.outputs(top), (weights, ids, probs)):
                graph.replace_uses(old, new)
            graph.replace_uses(Value(gate), logits)
            graph.remove(top)
            graph.remove(gate)
            changed = True
        if changed:
            InferShapes().run(graph, ctx)
        return changed


class FusePermute(Pass):
    name = "fuse-permute"
    description = "merge sort-by-expert, per-expert counts and offsets into one `permute` op"

    def __init__(self, block_m: int = 1):
        if block_m < 1:
            raise ValueError(f"block-m must be positive, got {block_m}")
        self.block_m = block_m

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for sort in graph.find("sort_by_expert"):
            ids = graph.inputs(sort)[0]
            counts = next((n for n in _users(graph, ids) if graph.op(n).kind == "count_experts"), None)
            if counts is None:
                continue
            offsets = next((n for n in _users(graph, Value(counts)) if graph.op(n).kind == "expert_offsets"), None)
            s_op = graph.op(sort)
            name = s_op.name.rsplit(".", 1)[0] + ".permute"
            node = graph.add(O.PermuteOp(name=name, num_experts=s_op.num_experts, block_m=self.block_m,
                                         **_common(s_op)), [ids], num_outputs=3, replaces=sort)
            order, cnt, offs = graph.outputs(node)
            graph.replace_uses(Value(sort), order)
            graph.replace_uses(Value(counts), cnt)
            if offsets is not None:
                graph.replace_uses(Value(offsets), offs)
                graph.remove(offsets)
            graph.remove(counts)
            graph.remove(sort)
            changed = True
        if changed:
            InferShapes().run(graph, ctx)
        return changed


class FuseExpertGemm(Pass):
    name = "fuse-expert-gemm"
    description = ("fold the row gather into the first expert GEMM, the activation after it, and the routing "
                   "weight and scatter-combine into the last GEMM: one `fused_experts` op per expert group")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for combine in graph.find("combine"):
            chain = self._match(graph, combine)
            if chain is None:
                continue
            gather, gemms, act, down = chain
            x, order = graph.inputs(gather)
            offsets = graph.inputs(down)[1]
            weights = graph.inputs(combine)[1]
            ids = graph.inputs(order.node)[0]
            up_op, act_op = graph.op(gemms["up"]), graph.op(act)
            expert = O.ExpertSpec(form="glu" if act_op.glu else "mlp", dim=up_op.in_dim, hidden=up_op.out_dim,
                                  act=act_op.act, bias=up_op.bias, weights=up_op.weights, lora_rank=up_op.lora_rank,
                                  lora_alpha=up_op.lora_alpha, lora_on=up_op.lora_on)
            name = up_op.name.rsplit(".", 1)[0]  # ...experts: the module holding the stacked weights
            node = graph.add(O.FusedExpertsOp(name=name, num_experts=up_op.num_experts, expert=expert,
                                              **_common(up_op)), [x, ids, weights, order, offsets],
                             replaces=gather)
            graph.replace_uses(Value(combine), Value(node))
            for dead in (combine, down, act, *gemms.values(), gather):
                graph.remove(dead)
            changed = True
        if changed:
            InferShapes().run(graph, ctx)
        return changed

    @staticmethod
    def _match(g: Graph, combine: int):
        """combine <- down <- activation <- up[, gate] <- gather, each value used only inside the chain."""
        down = _producer(g, combine, 0)
        if g.op(down).kind != "expert_gemm" or g.op(down).projection != "down":
            return None
        act = _producer(g, down, 0)
        if g.op(act).kind != "activation":
            return None
        gemms = {g.op(n).projection: n for n in (v.node for v in g.inputs(act))}
        if any(g.op(n).kind != "expert_gemm" for n in gemms.values()) or "up" not in gemms:
            return None
        gathers = {_producer(g, n, 0) for n in gemms.values()}
        if len(gathers) != 1:
            return None
        gather = gathers.pop()
        if g.op(gather).kind != "gather_rows":
            return None
        inner = [down, act, *gemms.values()]
        if any(len(_users(g, Value(n))) != 1 for n in inner):
            return None
        if set(_users(g, Value(gather))) != set(gemms.values()):
            return None
        return gather, gemms, act, down
