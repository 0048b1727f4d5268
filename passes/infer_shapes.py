"""infer-shapes: give every op output a TensorType, from a rule per op kind."""

from __future__ import annotations

from moec import ops as O
from moec.ir import Graph, IRError, TensorType

from .manager import Pass, PassContext


def _tokens(t: TensorType) -> str | int:
    return t.shape[0]


def infer(op: O.OpBase, ins: list[TensorType]) -> list[TensorType]:
    """Output types of `op` given its input types (raises IRError on a mismatch).

    Token-shaped outputs inherit the modality set of the op's first input unless the rule sets one.
    """
    outs = _rule(op, ins)
    if ins and ins[0].modalities:
        outs = [t if t.modalities or not t.shape else t.model_copy(update={"modalities": ins[0].modalities})
                for t in outs]
    return outs


def _rule(op: O.OpBase, ins: list[TensorType]) -> list[TensorType]:
    k = op.kind
    if k == "input":
        mods = op.input_modalities
        return [TensorType(shape=("T", op.dim), modalities=mods), TensorType(shape=("T",), dtype="i64", modalities=mods),
                TensorType(shape=("T",), dtype="i64", modalities=mods)]  # x, modality ids, task ids
    if k == "output":
        return []
    if k in ("norm", "attention", "latent_attention", "ffn"):
        dim = op.dim if k != "ffn" else op.expert.dim
        if ins[0].shape[-1] != dim:
            raise IRError(f"{op.name}: input width {ins[0].shape[-1]} != {dim}")
        return [ins[0]]
    if k == "depth_route":  # route (kept rows), and x / modality / task of the kept tokens
        if ins[0].shape[-1] != op.dim:
            raise IRError(f"{op.name}: input width {ins[0].shape[-1]} != {op.dim}")
        kept = f"{_tokens(ins[0])}_kept"
        return [TensorType(shape=(kept,), dtype="i64"), TensorType(shape=(kept, op.dim)),
                TensorType(shape=(kept,), dtype="i64"), TensorType(shape=(kept,), dtype="i64")]
    if k == "depth_combine":
        return [ins[0]]
    if k == "add":
        if ins[0].shape != ins[1].shape:
            raise IRError(f"{op.name}: adding {ins[0]} and {ins[1]}")
        return [ins[0]]
    if k == "attention_experts":
        if ins[0].shape[-1] != op.dim:
            raise IRError(f"{op.name}: input width {ins[0].shape[-1]} != {op.dim}")
        return [ins[0], TensorType(shape=(), dtype="f32"), TensorType(shape=(op.num_experts,), dtype="i64")]
    if k == "moe":
        experts = sum(g.routed_experts for g in op.groups)
        return [ins[0], TensorType(shape=(), dtype="f32"), TensorType(shape=(experts,), dtype="i64")]
    if k == "router_state":
        if ins[0].shape[-1] != op.dim:
            raise IRError(f"{op.name}: input width {ins[0].shape[-1]} != {op.dim}")
        if len(ins) > 1 and ins[1].shape != (_tokens(ins[0]), op.hidden):
            raise IRError(f"{op.name}: previous state {ins[1]} is not [{_tokens(ins[0])}, {op.hidden}]")
        return [TensorType(shape=(_tokens(ins[0]), op.hidden))]
    if k == "select_tokens":
        sym = f"T_{'_'.join(op.modality_names)}"
        return [TensorType(shape=(sym, ins[0].shape[-1]), modalities=op.modality_names),
                TensorType(shape=(sym,), dtype="i64", modalities=op.modality_names)]
    if k == "router_gate":
        return [TensorType(shape=(_tokens(ins[0]), op.num_experts))]
    if k == "route":
        t, slots = _tokens(ins[0]), op.router.slots(op.num_experts)
        return [TensorType(shape=(t, slots)), TensorType(shape=(t, slots), dtype="i64"),
                TensorType(shape=(t, op.num_experts))]
    if k == "mask_experts":
        return [ins[0]]
    if k == "identity_experts":  # (x, weights, ids) -> x's shape
        return [ins[0]]
    if k in ("sort_by_expert", "count_experts", "expert_offsets", "permute"):
        t, k_ = ins[0].shape if k != "expert_offsets" else (None, None)
        e = op.num_experts
        order = TensorType(shape=(f"{t}*{k_}",), dtype="i64")
        counts = TensorType(shape=(e,), dtype="i64")
        offsets = TensorType(shape=(e + 1,), dtype="i64")
        return {"sort_by_expert": [order], "count_experts": [counts], "expert_offsets": [offsets],
                "permute": [order, counts, offsets]}[k]
    if k == "gather_rows":
        return [TensorType(shape=(ins[1].shape[0], ins[0].shape[-1]), modalities=ins[0].modalities)]
    if k == "expert_gemm":
        if ins[0].shape[-1] != op.in_dim:
            raise IRError(f"{op.name}: input width {ins[0].shape[-1]} != {op.in_dim}")
        return [TensorType(shape=(ins[0].shape[0], op.out_dim))]
    if k == "router":
        t, slots = _tokens(ins[0]), op.router.slots(op.num_experts)
        return [TensorType(shape=(t, slots)), TensorType(shape=(t, slots), dtype="i64"),
                TensorType(shape=(t, op.num_experts)), TensorType(shape=(t, op.num_experts))]
    if k == "fused_experts":
        return [TensorType(shape=(_tokens(ins[0]), op.expert.dim))]
    if k == "activation":
        if len(ins) == 2 and ins[0].shape != ins[1].shape:
            raise IRError(f"{op.name}: GLU halves differ: {ins[0]} vs {ins[1]}")
        return [ins[0]]
    if k == "combine":
        return [TensorType(shape=(ins[1].shape[0], op.dim))]
    if k == "scatter_tokens":
        return [ins[2]]
    if k == "aux_loss":
        return [TensorType(shape=())]
    raise IRError(f"no shape rule for op kind `{k}`")


class InferShapes(Pass):
    name = "infer-shapes"
    description = "give every value a symbolic shape, dtype and modality set"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        for node in graph.nodes():
            ins = [graph.type_of(v) for v in graph.inputs(node)]
            graph.set_types(node, tuple(infer(graph.op(node), ins)))
        return True
