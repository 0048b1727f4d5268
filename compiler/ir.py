"""The IR: a graph of ops over `networkx.MultiDiGraph`.

A node is one op (attributes: a pydantic model from :mod:`moec.ops`). An edge runs from an
op's output port to a user's input port and carries the :class:`TensorType` of that value.
Passes use this class's API, never networkx directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from moec import ops as O
from pydantic import BaseModel, ConfigDict


class TensorType(BaseModel):
    """Symbolic shape (ints and symbol names such as "T" or "T_text"), dtype, modality set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: tuple[int | str, ...]
    dtype: str = "f32"
    modalities: tuple[str, ...] = ()

    def __str__(self) -> str:
        mods = f" {{{','.join(self.modalities)}}}" if self.modalities else ""
        return f"[{','.join(str(s) for s in self.shape)}] {self.dtype}{mods}"


@dataclass(frozen=True)
class Value:
    """Output `port` of node `node`."""

    node: int
    port: int = 0


class IRError(Exception):
    pass


class Graph:
    def __init__(self, name: str):
        self.name = name
        self._g = nx.MultiDiGraph()
        self._next = 0
        self._placed: dict[int, int] = {}  # node -> ops added in its place so far

    # ---- construction -------------------------------------------------------------------
    def add(self, op: O.OpBase, inputs: list[Value] = (), num_outputs: int = 1, replaces: int | None = None) -> int:
        """Add an op; `replaces` gives it that node's place in the printed order (for rewrites)."""
        node = self._next
        self._next += 1
        if replaces is None:
            rank = (float(node),)
        else:  # after the replaced op and after what was already added in its place
            base = self._g.nodes[replaces]["rank"]
            self._placed[replaces] = self._placed.get(replaces, 0) + 1
            rank = (*base, self._placed[replaces])
        self._g.add_node(node, op=op, num_outputs=num_outputs, types=None, rank=rank)
        for port, value in enumerate(inputs):
            self._g.add_edge(value.node, node, src_port=value.port, dst_port=port)
        return node

    def outputs(self, node: int) -> list[Value]:
        return [Value(node, p) for p in range(self._g.nodes[node]["num_outputs"])]

    def op(self, node: int) -> O.OpBase:
        return self._g.nodes[node]["op"]

    def set_op(self, node: int, op: O.OpBase) -> None:
        self._g.nodes[node]["op"] = op

    def types(self, node: int) -> tuple[TensorType, ...] | None:
        return self._g.nodes[node]["types"]

    def set_types(self, node: int, types: tuple[TensorType, ...]) -> None:
        if len(types) != self._g.nodes[node]["num_outputs"]:
            raise IRError(f"node %{node} ({self.op(node).kind}) has {self._g.nodes[node]['num_outputs']} "
                          f"outputs but {len(types)} types were given")
        self._g.nodes[node]["types"] = tuple(types)

    def type_of(self, value: Value) -> TensorType | None:
        types = self.types(value.node)
        return types[value.port] if types else None

    def inputs(self, node: int) -> list[Value]:
        edges = sorted(self._g.in_edges(node, data=True), key=lambda e: e[2]["dst_port"])
        return [Value(src, d["src_port"]) for src, _, d in edges]

    def input_ports(self, node: int) -> list[int]:
        return sorted(d["dst_port"] for _, _, d in self._g.in_edges(node, data=True))

    def users(self, value: Value) -> list[tuple[int, int]]:
        """(node, input port) pairs that read `value`."""
        return sorted((dst, d["dst_port"]) for _, dst, d in self._g.out_edges(value.node, data=True)
                      if d["src_port"] == value.port)

    def set_inputs(self, node: int, values: list[Value]) -> None:
        for src, _, key in list(self._g.in_edges(node, keys=True)):
            self._g.remove_edge(src, node, key)
        for port, value in enumerate(values):
            self._g.add_edge(value.node, node, src_port=value.port, dst_port=port)

    def replace_uses(self, old: Value, new: Value) -> None:
        for dst, port in self.users(old):
            for key, d in list(self._g.get_edge_data(old.node, dst).items()):
                if d["src_port"] == old.port and d["dst_port"] == port:
                    self._g.remove_edge(old.node, dst, key)
            self._g.add_edge(new.node, dst, src_port=new.port, dst_port=port)

    def remove(self, node: int) -> None:
        if any(True for _ in self._g.out_edges(node)):
            raise IRError(f"cannot remove %{node} ({self.op(node).kind}): it still has users")
        self._g.remove_node(node)

    def remove_dead(self, keep: int) -> None:
        """Remove ops whose values no path reaches `keep` (the output op) from."""
        alive = nx.ancestors(self._g, keep) | {keep}
        for node in [n for n in self._g.nodes if n not in alive]:
            self._g.remove_node(node)

    # ---- queries --------------------------------------------------------------------------
    def nodes(self) -> list[int]:
        """Ops in a deterministic topological order (ties broken by creation order; an op added by a
        rewrite takes the place of the op it replaces)."""
        rank = nx.get_node_attributes(self._g, "rank")
        return list(nx.lexicographical_topological_sort(self._g, key=lambda n: (rank[n], n)))

    def find(self, kind: str) -> list[int]:
        return [n for n in self.nodes() if self.op(n).kind == kind]

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def is_acyclic(self) -> bool:
        return nx.is_directed_acyclic_graph(self._g)

    def num_outputs(self, node: int) -> int:
        return self._g.nodes[node]["num_outputs"]

    # ---- printing -------------------------------------------------------------------------
    def print(self) -> str:
        """One op per line, values renumbered in topological order, so dumps can be diffed."""
        names: dict[Value, str] = {}
        lines = [f"graph @{self.name} {{"]
        counter = 0
        for node in self.nodes():
            outs = []
            for v in self.outputs(node):
                names[v] = f"%{counter}"
                outs.append(names[v])
                counter += 1
            op = self.op(node)
            args = ", ".join(names[v] for v in self.inputs(node))
            attrs = _format_attrs(op)
            types = self.types(node)
            type_str = f" : {', '.join(str(t) for t in types)}" if types else ""
            lhs = f"{', '.join(outs)} = " if outs else ""
            lines.append(f"  {lhs}{op.kind}({args}){attrs}{type_str}  // {op.name}")
        lines.append("}")
        return "\n".join(lines) + "\n"


_SKIP_ATTRS = {"kind", "name", "layer", "block", "loc"}


def format_value(v) -> str:
    if isinstance(v, BaseModel):  # nested specs: only what differs from the defaults (required fields always)
        info, shown = type(v).model_fields, getattr(type(v), "always_shown", ())
        fields = [f"{k}={format_value(x)}" for k, x in v
                  if x is not None and (k in shown or k not in _SKIP_ATTRS and
                                        (info[k].is_required() or x != info[k].default))]
        return "<" + ", ".join(fields) + ">"
    if isinstance(v, tuple):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _format_attrs(op: O.OpBase) -> str:
    quiet, info = getattr(type(op), "quiet_when_default", ()), type(op).model_fields
    fields = [f"{k}={format_value(v)}" for k, v in op
              if k not in _SKIP_ATTRS and v is not None and not (k in quiet and v == info[k].default)]
    return f" {{{', '.join(fields)}}}" if fields else ""
