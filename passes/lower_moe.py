"""lower-moe: each `moe` op becomes, per expert group,

    select_tokens -> router_gate -> route -> sort_by_expert, count_experts -> expert_offsets
    -> gather_rows -> expert_gemm (gate/up) -> activation -> expert_gemm (down) -> combine
    -> scatter_tokens

plus an `ffn` for always-on shared experts, `add`s summing the groups, an `aux_loss` per group
with loss terms, and the per-group expert counts handed to the output op. Zero-computation
experts (identity / zero) are masked out of the expert GEMMs before the sort (`mask_experts`);
`identity_experts` adds their share (the routing-weighted input). A recurrent router's state (the
moe op's fourth input) feeds the router gates in place of the token rows.
"""

from __future__ import annotations

from moec import ops as O
from moec.ir import Graph, Value

from .infer_shapes import InferShapes
from .manager import Pass, PassContext


class LowerMoE(Pass):
    name = "lower-moe"
    description = "expand moe ops into router, permutation, expert GEMM and combine primitives"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        moes = graph.find("moe")
        inp = graph.op(graph.find("input")[0])
        expanded: dict[Value, list[Value]] = {}  # each MoE's aux loss and counts -> the values that replace them
        for node in moes:
            expanded.update(self._lower(graph, node, inp.modalities, inp.input_modalities))
        # the readers (the output op reads every layer's) are rewired once, after every layer
        for user in sorted({user for v in expanded for user, _ in graph.users(v)}):
            graph.set_inputs(user, [w for v in graph.inputs(user) for w in expanded.get(v, [v])])
        for node in moes:
            graph.remove(node)
        if moes:
            InferShapes().run(graph, ctx)
        return bool(moes)

    def _lower(self, g: Graph, node: int, moe_modalities: tuple[str, ...],
               carried: tuple[str, ...]) -> dict[Value, list[Value]]:
        moe: O.MoEOp = g.op(node)
        h, modality, task, *state = g.inputs(node)  # state: a recurrent router's, read by the gates
        y_out, aux_out, counts_out = g.outputs(node)

        def mk(op_cls, suffix: str, inputs: list[Value], n_out: int = 1, **attrs) -> list[Value]:
            op = op_cls(name=f"{moe.name}.{suffix}", layer=moe.layer, block=moe.block, loc=moe.loc, **attrs)
            return g.outputs(g.add(op, inputs, num_outputs=n_out, replaces=node))

        losses: list[Value] = []
        counts: dict[str, Value] = {}  # per group, summed over the iterations
        total: Value | None = None  # the sum of the iterations' outputs
        for it in range(moe.iterations):
            x_it = h if total is None else mk(O.AddOp, f"iteration_{it}_input", [h, total])[0]
            y_it = self._iteration(g, moe, it, x_it, modality, task, moe_modalities, carried, mk, losses, counts,
                                   state[0] if state else None)
            total = y_it if total is None else mk(O.AddOp, f"iteration_{it}_sum", [total, y_it])[0]
        g.replace_uses(y_out, total)
        return {aux_out: losses, counts_out: list(counts.values())}

    def _iteration(self, g: Graph, moe: O.MoEOp, it: int, h: Value, modality: Value, task: Value,
                   moe_modalities: tuple[str, ...], carried: tuple[str, ...], mk, losses: list[Value],
                   counts: dict[str, Value], state: Value | None = None) -> Value:
        """One pass of every group (and the shared experts) over h; iteration `it` > 0 of a chain has
        its own routers (`router_1`, ...) and reuses the experts. With a recurrent router's `state`,
        the gates read the group's rows of the state instead of h."""
        total: Value | None = None
        n_groups = len(moe.groups)
        suffix = f"_{it}" if it else ""
        for index, grp in enumerate(moe.groups):
            prefix = grp.name if n_groups > 1 or grp.name != "all" else ""
            p = f"{prefix}." if prefix else ""
            if {moe_modalities[i] for i in grp.modalities} >= set(carried):  # the group sees every token
                xg, idx, sg = h, None, state
            else:
                select = {"modalities": grp.modalities,
                          "modality_names": tuple(moe_modalities[i] for i in grp.modalities)}
                xg, idx = mk(O.SelectTokensOp, f"{p}select".lstrip("."), [h, modality], 2, **select)
                sg = None if state is None else mk(O.SelectTokensOp, f"{p}state_select", [state, modality], 2,
                                                   **select)[0]
            e, ex = grp.num_experts, grp.expert
            routed = grp.routed_experts  # with zero-computation experts after the computed ones
            r = grp.router
            if r.learned:
                balance = r.bias_update if r.kind == "group_limited" else 0.0
                gate_in, gate_dim = (xg, moe.dim) if sg is None else (sg, moe.recurrent.hidden)
                (logits,) = mk(O.RouterGateOp, f"{p}router{suffix}", [gate_in], dim=gate_dim, num_experts=routed,
                               jitter=r.jitter, balance_rate=balance)
                source = logits
            else:  # deterministic: experts chosen by modality id, task id or a hash of the token index
                logits, source = None, {"modality": modality, "task": task, "hash": xg}[r.by]
            weights, ids, probs = mk(O.RouteOp, f"{p}route{suffix}", [source], 3, router=r, num_experts=routed)
            computed_ids, skip = ids, None
            if routed > e:
                (routed_cnt,) = mk(O.CountExpertsOp, f"{p}routed_counts", [ids], num_experts=routed)
                (computed_ids,) = mk(O.MaskExpertsOp, f"{p}mask_zero_computation", [ids], num_experts=e)
                if grp.num_identity:
                    (skip,) = mk(O.IdentityExpertsOp, f"{p}identity_experts", [xg, weights, ids], first=e,
                                 count=grp.num_identity)
            (order,) = mk(O.SortByExpertOp, f"{p}sort", [computed_ids], num_experts=e)
            (cnt,) = mk(O.CountExpertsOp, f"{p}counts", [computed_ids], num_experts=e)
            (offsets,) = mk(O.ExpertOffsetsOp, f"{p}offsets", [cnt], num_experts=e)
            (rows,) = mk(O.GatherRowsOp, f"{p}gather", [xg, order])
            gemm = {"num_experts": e, "bias": ex.bias, "weights": ex.weights, "lora_rank": ex.lora_rank,
                    "lora_alpha": ex.lora_alpha, "lora_on": ex.lora_on}
            (up,) = mk(O.ExpertGemmOp, f"{p}experts.up_proj", [rows, offsets], projection="up", in_dim=ex.dim,
                       out_dim=ex.hidden, **gemm)
            if ex.form == "glu":
                (gate,) = mk(O.ExpertGemmOp, f"{p}experts.gate_proj", [rows, offsets], projection="gate",
                             in_dim=ex.dim, out_dim=ex.hidden, **gemm)
                (act,) = mk(O.ActivationOp, f"{p}experts.act", [gate, up], act=ex.act, glu=True)
            else:
                (act,) = mk(O.ActivationOp, f"{p}experts.act", [up], act=ex.act, glu=False)
            (down,) = mk(O.ExpertGemmOp, f"{p}experts.down_proj", [act, offsets], projection="down",
                         in_dim=ex.hidden, out_dim=ex.dim, **gemm)
            (yg,) = mk(O.CombineOp, f"{p}combine", [down, weights, order], dim=moe.dim)
            if skip is not None:
                (yg,) = mk(O.AddOp, f"{p}identity_add", [yg, skip])
            if grp.shared is not None:
                (s,) = mk(O.FFNOp, f"{p}shared", [xg], expert=grp.shared.widened(grp.num_shared))
                (yg,) = mk(O.AddOp, f"{p}shared_add", [yg, s])
            if idx is not None:
                (yg,) = mk(O.ScatterTokensOp, f"{p}scatter", [yg, idx, h])
            if (moe.losses.load_balance or moe.losses.z_loss) and logits is not None:
                (loss,) = mk(O.AuxLossOp, f"{p}aux_loss", [logits, probs, ids], losses=moe.losses,
                             num_experts=routed)
                losses.append(loss)
            cnt = cnt if routed == e else routed_cnt
            counts[grp.name] = cnt if grp.name not in counts else mk(
                O.AddOp, f"{p}counts_sum{suffix}", [counts[grp.name], cnt])[0]
            total = yg if total is None else mk(O.AddOp, f"sum{suffix}_{index}", [total, yg])[0]
        if moe.shared is not None:
            (s,) = mk(O.FFNOp, "shared", [h], expert=moe.shared.widened(moe.num_shared), gate=moe.shared_gate)
            (total,) = mk(O.AddOp, f"shared_add{suffix}", [total, s])
        return total


