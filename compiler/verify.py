"""The rules every IR graph satisfies, written as data and checked by one `verify()`."""

from __future__ import annotations

from moec.ir import Graph, IRError
from moec.passes.infer_shapes import infer

# kind -> (allowed input counts, output count); None means "any number".
ARITY: dict[str, tuple[tuple[int, ...] | None, int]] = {
    "input": ((0,), 3),
    "output": (None, 0),
    "norm": ((1, 2), 1),  # (x[, modality ids] when per_modality)
    "attention": ((1, 2, 3), 1),  # (x[, modality ids] when per_modality[, route] when kept_tokens)
    "attention_experts": ((1,), 3),  # x -> (x, aux loss, tokens per expert)
    "latent_attention": ((1,), 1),
    "ffn": ((1, 2), 1),  # (x[, modality ids] when per_modality)
    "add": ((2,), 1),
    "depth_route": ((3,), 4),
    "depth_combine": ((3,), 1),
    "moe": ((3, 4), 3),  # (x, modality ids, task ids[, recurrent router state])
    "router_state": ((1, 2), 1),  # (router input[, previous MoE layer's state])
    "select_tokens": ((2,), 2),
    "router_gate": ((1,), 1),
    "route": ((1,), 3),
    "mask_experts": ((1,), 1),
    "identity_experts": ((3,), 1),
    "sort_by_expert": ((1,), 1),
    "count_experts": ((1,), 1),
    "expert_offsets": ((1,), 1),
    "permute": ((1,), 3),
    "gather_rows": ((2,), 1),
    "expert_gemm": ((2,), 1),
    "activation": ((1, 2), 1),
    "combine": ((3,), 1),
    "scatter_tokens": ((3,), 1),
    "aux_loss": ((3,), 1),
    "router": ((1,), 4),
    "fused_experts": ((5,), 1),
}


def verify(graph: Graph) -> None:
    """Raise IRError naming the first broken rule: acyclic, arity, ports, types, one input/output."""
    if not graph.is_acyclic():
        raise IRError("graph has a cycle")
    counts = {"input": 0, "output": 0}
    for node in graph.nodes():
        op = graph.op(node)
        if op.kind not in ARITY:
            raise IRError(f"%{node}: unknown op kind `{op.kind}`")
        ins, outs = ARITY[op.kind]
        inputs = graph.inputs(node)
        n_in = len(inputs)
        if ins is not None and n_in not in ins:
            raise IRError(f"%{node} ({op.kind} {op.name}): {n_in} inputs, expected {' or '.join(map(str, ins))}")
        if graph.num_outputs(node) != outs:
            raise IRError(f"%{node} ({op.kind} {op.name}): {graph.num_outputs(node)} outputs, expected {outs}")
        if graph.input_ports(node) != list(range(n_in)):
            raise IRError(f"%{node} ({op.kind} {op.name}): input ports are not 0..{n_in - 1}")
        types = graph.types(node)
        if types is not None:
            in_types = [graph.type_of(v) for v in inputs]
            if all(t is not None for t in in_types) and tuple(infer(op, in_types)) != types:
                raise IRError(f"%{node} ({op.kind} {op.name}): stored types do not re-infer")
        if op.kind in counts:
            counts[op.kind] += 1
    if counts != {"input": 1, "output": 1}:
        raise IRError(f"graph must have exactly one input and one output op, has {counts}")
