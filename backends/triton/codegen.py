"""Fused IR -> `<model>.py` calling Triton kernels, and `<model>_kernels.py` with those kernels.

The block emitter is the PyTorch backend's, with the MoE ops lowered differently:

- `router` ops whose kind the router kernel covers (token-choice top-k without capacity,
  group-limited) become one `fused_route` launch; other routers keep their PyTorch routing and
  feed the same expert kernels.
- A MoE layer with several modality groups, all kernel-routed, keeps every token in place: each
  group's router runs over all tokens under the group's token mask (no gather, no host sync),
  and when the groups' experts have one shape, one `fused_experts` call runs all of them over
  their concatenated weights (group offsets in the expert id space).
- `permute` needs no code (the alignment runs inside `fused_experts`); `fused_experts` becomes
  the Triton expert GEMMs.
"""

from __future__ import annotations

import re
from importlib import resources

import jinja2
from moec import __version__
from moec import ops as O
from moec.backends import BackendError
from moec.backends.pytorch.codegen import (
    _MERGED,
    RUNTIME_MODULES,
    BlockView,
    _BlockEmitter,
    _call,
    _ffn_ctor,
    _norm_ctor,
    _weight,
    emit_blocks,
    module_name,
    router_cell,
)
from moec.ir import Graph

from .kernels import KernelSet, kernel_routed

TRITON_RUNTIME = ("moec_triton", "runtime.py",
                  ("Blocks", "fused_experts", "fused_route", "merge_groups", "observe_counts"))
_OWN_NAMES = {"kernels", "BLOCKS", *TRITON_RUNTIME[2]}


class _TritonBlockEmitter(_BlockEmitter):
    merges_groups = False  # merged through the router kernels' masks below instead

    def __init__(self, graph: Graph, nodes: list[int], view: BlockView, kernels: KernelSet):
        super().__init__(graph, self._route_first(graph, nodes), view)
        self.kernels = kernels
        self.masks: dict[str, str] = {}  # group path -> its token mask
        self.counts: dict[str, tuple[str, int]] = {}  # group path -> (per-expert counts, experts counted)
        self.pytorch_notes: list[str] = []

    # ---- layout decisions per MoE region (regions, group keys and the routing-first order are the
    # PyTorch emitter's; the merge condition is this target's own) -------------------------------
    @staticmethod
    def _masked(graph: Graph, members: list[int]) -> bool:
        """Modality groups, all kernel-routed: route under token masks, tokens stay in place."""
        routers = [graph.op(n) for n in members if graph.op(n).kind in ("router", "route")]
        return any(graph.op(n).kind == "select_tokens" for n in members) and \
            all(r.kind == "router" and kernel_routed(r.router) for r in routers)

    @classmethod
    def _merged(cls, graph: Graph, members: list[int]) -> bool:
        """Masked, and the groups partition the tokens (each selected by modality, no group over
        every token beside them), run once each (no chained iterations), with experts of one
        shape: one expert launch for all groups."""
        experts = [n for n in members if graph.op(n).kind == "fused_experts"]
        groups = [cls._group_key(graph, n) for n in experts]
        selected = {cls._group_key(graph, n) for n in members if graph.op(n).kind == "select_tokens"}
        return (cls._masked(graph, members) and len(experts) > 1 and len(set(groups)) == len(groups)
                and set(groups) <= selected and len({graph.op(n).expert for n in experts}) == 1)

    def region_members(self, node: int) -> list[int]:
        return self._regions(self.g, self.nodes)[self.region(node)]

    def fresh(self, base: str) -> str:
        name = super().fresh(base)
        while name in _OWN_NAMES:
            name = super().fresh(base)
        return name

    # ---- token selection ------------------------------------------------------------------
    def _op_select_tokens(self, node, op, ins, path):
        if not self._masked(self.g, self.region_members(node)):
            return super()._op_select_tokens(node, op, ins, path)
        xs, idx = self.g.outputs(node)
        group = self.group_of_path(path)
        self.names[xs] = ins[0]  # the group's router sees every token under its mask
        if (ins[1], op.modalities) in self.selections:  # the same tokens again (a group's router state)
            self.names[idx] = self.selections[(ins[1], op.modalities)]
            return
        self.names[idx] = mask = self.fresh(f"{self.group_of(node)}_mask")
        self.masks[group] = mask
        self.selections[(ins[1], op.modalities)] = mask
        self.line(f"{mask} = token_mask_for({ins[1]}, {tuple(op.modalities)!r})")

    def _op_scatter_tokens(self, node, op, ins, path):
        if self.group_of_path(path) not in self.masks:
            return super()._op_scatter_tokens(node, op, ins, path)
        self.names[self.g.outputs(node)[0]] = ins[0]  # already [T, d], zero outside the group

    def _op_ffn(self, node, op, ins, path):
        mask = self.masks.get(self.group_of_path(path))
        if mask is None:
            return super()._op_ffn(node, op, ins, path)
        attr = self.module(path, _ffn_ctor(op.expert))
        (h,) = self.assign(node, [path[-1]])
        self.line(f"{h} = torch.where({mask}.unsqueeze(-1), {attr}({ins[0]}), 0.0)  # this group's tokens only")

    def _op_add(self, node, op, ins, path):
        live = [i for i in ins if i != _MERGED]
        if len(live) == 2:
            return super()._op_add(node, op, ins, path)
        self.names[self.g.outputs(node)[0]] = live[0] if live else _MERGED

    # ---- routing ---------------------------------------------------------------------------
    def _op_router(self, node, op, ins, path):
        r = op.router
        if not kernel_routed(r):
            capacity = (" with capacity" if r.kind == "top_k" and r.capacity is not None else
                        " with a temperature" if r.temperature != 1.0 else "")
            self.pytorch_notes.append(f"{'.'.join(path[:-1])}: {r.kind} router{capacity}")
            return super()._op_router(node, op, ins, path)
        w, ids, probs, logits = self.assign(node, ["weights", "expert_ids", "probs", "logits"])
        group = self.group_of_path(path)
        counts = self.fresh(f"{self.group_of(node) + '_' if self.group_of(node) else ''}counts")
        ctor = (f"BalancedRouter({op.dim}, {op.num_experts}, rate={op.balance_rate!r})" if op.balance_rate
                else f"nn.Linear({op.dim}, {op.num_experts}, bias=False)")
        attr = self.module(path, ctor)
        self.routers[group] = attr
        x = ins[0]
        if r.jitter:
            x = self.fresh(f"{logits}_input")
            self.line(f"{x} = router_jitter({ins[0]}, {r.jitter!r}, self.training)")
        kernel = self.kernels.router(r, op.num_experts)
        args = [f"kernels.{kernel}", "kernels", x, f"{attr}.weight", f"k={r.k}", f"score={r.score!r}",
                f"renormalize={r.renormalize}", f"scale={float(r.scale)!r}"]
        if r.kind == "group_limited":
            args.append(f"bias={attr}.score_bias")
        if group in self.masks:
            args.append(f"token_mask={self.masks[group]}")
        self.line(_call(f"{w}, {ids}, {probs}, {logits}, {counts}", "fused_route", [*args, "blocks=BLOCKS"]))
        if op.balance_rate:
            self.line(f"observe_counts({attr}, {counts})")
        self.counts[group] = (counts, op.num_experts)

    def _op_route(self, node, op, ins, path):
        """Routers without a gate (deterministic by modality, task or hash) route in PyTorch."""
        self.pytorch_notes.append(f"{'.'.join(path[:-1])}: {op.router.kind} router")
        super()._op_route(node, op, ins, path)

    def _op_permute(self, node, op, ins, path):
        order, counts, offsets = self.g.outputs(node)
        self.names[order] = self.names[offsets] = "None"  # the alignment runs inside fused_experts
        group = self.group_of_path(path)
        if self.counts.get(group, (None, None))[1] == op.num_experts:
            self.names[counts] = self.counts[group][0]
            return
        (name,) = self.assign_values([counts], ["counts"], node)  # e.g. zero-computation experts masked out
        self.line(f"{name} = expert_counts({ins[0]}, {op.num_experts})")
        self.counts[group] = (name, op.num_experts)

    # ---- experts ---------------------------------------------------------------------------
    def _op_fused_experts(self, node, op, ins, path):
        self.kernels.activation(op.expert.act)
        members = self.region_members(node)
        if not self._merged(self.g, members):
            (y,) = self.assign(node, ["y"])
            group = self.group_of_path(path)
            args = self._weights([(path, op)], op.expert)
            counts = [f"counts={self.counts[group][0]}"] if group in self.counts else []
            self.line(_call(y, "fused_experts", ["kernels", *ins[:3], *args, *counts, "blocks=BLOCKS"]))
            return
        groups = [n for n in members if self.g.op(n).kind == "fused_experts"]
        if node != groups[0]:
            self.names[self.g.outputs(node)[0]] = _MERGED
            return
        parts = [(self.rel(n), self.g.op(n)) for n in groups]
        keys = [self.group_of_path(p) for p, _ in parts]
        offsets, total = [], 0
        for n in groups:
            offsets.append(total)
            total += self.g.op(n).num_experts
        routing = [[self.ref(v, n) for v in self.g.inputs(n)[1:3]] for n in groups]  # (expert ids, weights)
        ids, w = self.fresh("expert_ids"), self.fresh("weights")
        self.line(_call(f"{ids}, {w}", "merge_groups", [
            "[" + ", ".join(r[0] for r in routing) + "]", "[" + ", ".join(r[1] for r in routing) + "]",
            repr(offsets)]))
        counts = self.fresh("counts")
        self.line(f"{counts} = torch.cat([{', '.join(self.counts[k][0] for k in keys)}])")
        self.names[self.g.outputs(node)[0]] = y = self.fresh("y")
        self.line(f"# one launch per kernel for all {len(groups)} groups: {total} experts, group offsets {offsets}")
        self.line(_call(y, "fused_experts", ["kernels", ins[0], ids, w, *self._weights(parts, op.expert),
                                            f"counts={counts}", "blocks=BLOCKS"]))

    def _weights(self, groups: list[tuple[list[str], O.FusedExpertsOp]], e: O.ExpertSpec) -> list[str]:
        """Stacked expert weights of one or more groups (concatenated along the expert axis)."""
        attrs = [self._experts_module(path, op, e.form == "glu", e.dim, e.hidden, e.bias) for path, op in groups]

        def stacked(name: str, kind: str) -> str:
            parts = [_weight(a, name, e.weights) if kind == "weight" else f"{a}.{name}" for a in attrs]
            return parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}])"

        args = [stacked("up_proj", "weight"), stacked("down_proj", "weight")]
        if e.form == "glu":
            args.append(f"gate_proj={stacked('gate_proj', 'weight')}")
        args.append(f"activation={e.act!r}")
        if e.bias:
            args += [f"up_bias={stacked('up_bias', 'bias')}", f"down_bias={stacked('down_bias', 'bias')}"]
            if e.form == "glu":
                args.append(f"gate_bias={stacked('gate_bias', 'bias')}")
        return args

    # ---- losses ----------------------------------------------------------------------------
    def _op_aux_loss(self, node, op, ins, path):
        mask = self.masks.get(self.group_of_path(path))
        if mask is None:
            return super()._op_aux_loss(node, op, ins, path)
        self.masked_aux_loss(node, op, ins, mask)


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FunctionLoader(_template), trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def _template(name: str) -> str:
    return resources.files("moec.backends.triton").joinpath("templates", name).read_text()


def render(graph: Graph, source: str, targets: dict | None = None) -> dict[str, str]:
    """File name -> source: the model module and its kernel module."""
    if graph.find("expert_gemm"):
        raise BackendError("the triton target needs the fused pipeline (drop --pipeline unfused)")
    blocks_cfg = dict((targets or {}).get("triton", {}))  # tile sizes, checked by the language checker
    module = module_name(graph.name)
    kernels_module = f"{module}_kernels"
    kernels = KernelSet()
    inp = graph.op(graph.find("input")[0])
    pytorch_notes: list[str] = []

    def emit(nodes: list[int], view) -> None:
        emitter = _TritonBlockEmitter(graph, nodes, view, kernels)
        emitter.emit()
        pytorch_notes.extend(f"{view.class_name}.{note}" for note in emitter.pytorch_notes)

    blocks, layers = emit_blocks(graph, emit)
    final = [n for n in graph.find("norm") if graph.op(n).layer is None]
    text = "\n".join(line for b in blocks.values() for line in b.body + [b.returns] + [m.ctor for m in b.modules])
    used = {"ModelOutput", "check_modality"} | set(re.findall(r"\b([A-Za-z_]\w*)[.(]", text))
    tables = [*((m, names) for m, (_, names) in RUNTIME_MODULES.items()), (TRITON_RUNTIME[0], TRITON_RUNTIME[2])]
    imports = [(m, sorted((n for n in names if n in used or n == "Blocks"), key=lambda n: (n[0].islower(), n)))
               for m, names in tables]
    per_layer = {b.class_name: b.host_syncs for b in blocks.values()}
    if not kernels.activations:
        kernels.activation("identity")  # a model without MoE layers still gets a valid kernel file
    common = {"version": __version__, "source": source, "model_name": graph.name}
    plain = ["torch"] + ([f"{kernels_module} as kernels"] if re.search(r"\bkernels\b", text) else [])
    model = _env().get_template("model.py.j2").render(
        **common, imports=sorted((m, names) for m, names in imports if names), plain_imports=sorted(plain),
        kernels_module=kernels_module,
        blocks_cfg=", ".join(f"{k}={v}" for k, v in blocks_cfg.items()), pytorch_routers=pytorch_notes,
        modalities=inp.modalities, modalities_tuple=repr(tuple(inp.modalities)), d_model=inp.dim,
        blocks=list(blocks.values()), layers=layers, final_norm=_norm_ctor(graph.op(final[0])) if final else None,
        router_cell=router_cell(graph), total_syncs=sum(per_layer[layer.cls] for layer in layers),
        uses_task=any(graph.op(n).kind in ("route", "router") and graph.op(n).router.by == "task"
                      for n in graph.nodes()))
    kernel_text = _env().get_template("kernels.py.j2").render(
        **common, routers=kernels.routers, activations=kernels.activations,
        tune_router="block_t" not in blocks_cfg, tune_gemm=not {"block_n", "block_k"} & set(blocks_cfg))
    return {f"{module}.py": model, f"{kernels_module}.py": kernel_text}


def runtime_files() -> dict[str, str]:
    """The PyTorch runtime modules (layers, PyTorch routers, losses) plus the Triton launcher."""
    from moec.backends.pytorch import runtime_files as pytorch_runtime

    files = pytorch_runtime()
    files[f"{TRITON_RUNTIME[0]}.py"] = resources.files("moec.backends.triton").joinpath(TRITON_RUNTIME[1]).read_text()
    return files

