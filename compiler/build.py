"""ModelSpec -> IR graph: the residual wiring of every layer, one op per sublayer (and the state
update of a recurrent router, whose state is an edge from MoE layer to MoE layer)."""

from __future__ import annotations

from moec import ops as O
from moec.dsl.elaborate import ModelSpec
from moec.ir import Graph, Value


def build_graph(spec: ModelSpec) -> Graph:
    g = Graph(spec.name)
    inp = g.add(O.InputOp(name="input", dim=spec.dim, modalities=spec.modalities,
                          input_modalities=spec.input_modalities, loc=spec.loc), num_outputs=3)
    x, modality, task = g.outputs(inp)
    extras: list[Value] = []  # aux losses and expert counts, gathered by the output op
    state: Value | None = None  # a recurrent router's state, carried from MoE layer to MoE layer
    for i, block in enumerate(spec.layers):
        def at(op: O.OpBase, i=i, block=block) -> O.OpBase:
            return op.model_copy(update={"name": f"layers.{i}.{op.name}", "layer": i, "block": block.key})

        tokens = (modality, task)  # the ids of the tokens the block processes
        route = None
        if block.depth is not None:  # Mixture-of-Depths: the sublayers see the kept tokens only
            d = block.depth
            op = O.DepthRouteOp(name="depth", dim=spec.dim, ratio=d.ratio_at(i, len(spec.layers)),
                                modalities=d.modalities, weight=d.weight, loc=block.loc)
            route, x_kept, *tokens = g.outputs(g.add(at(op), [x, modality, task], num_outputs=4))
            block_input, x = x, x_kept

        def ids(op: O.OpBase, tokens=tokens) -> list[Value]:  # per-modality copies also read the modality ids
            return [tokens[0]] if getattr(op, "per_modality", ()) else []

        for sub in block.sublayers:
            pre = block.residual == "pre_norm"
            h = Value(g.add(at(sub.norm), [x, *ids(sub.norm)])) if pre else x
            if isinstance(sub.op, O.MoEOp):
                ins = [h, *tokens]
                if sub.op.recurrent is not None:  # h_l = GRU(P_l h, h_{l-1}); the routers read h_l
                    r = sub.op.recurrent
                    update = O.RouterStateOp(name=f"{sub.op.name}.router_state", cell=r.cell, dim=sub.op.dim,
                                             hidden=r.hidden, projection=r.projection, loc=sub.op.loc)
                    state = Value(g.add(at(update), [h] if state is None else [h, state]))
                    ins.append(state)
                node = g.add(at(sub.op), ins, num_outputs=3)
                out, aux, counts = g.outputs(node)
                extras += [aux, counts]
            elif isinstance(sub.op, O.AttentionExpertsOp):  # (x, aux loss, tokens per attention expert)
                node = g.add(at(sub.op), [h], num_outputs=3)
                out, aux, counts = g.outputs(node)
                extras += [aux, counts]
            else:
                kept = [route] if getattr(sub.op, "kept_tokens", False) else []
                out = Value(g.add(at(sub.op), [h, *ids(sub.op), *kept]))
            x = Value(g.add(at(O.AddOp(name=f"{sub.op.name}_residual", loc=sub.op.loc)), [x, out]))
            if not pre:
                x = Value(g.add(at(sub.norm), [x, *ids(sub.norm)]))
        if route is not None:
            combine = O.DepthCombineOp(name="depth_combine", loc=block.loc)
            x = Value(g.add(at(combine), [block_input, x, route]))
    if spec.final_norm is not None:
        x = Value(g.add(spec.final_norm, [x]))
    g.add(O.OutputOp(name="output", loc=spec.loc), [x, *extras], num_outputs=0)
    return g
