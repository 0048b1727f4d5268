"""Writes a decoder description (`Decoder`) as readable `.moe` text.

Every value written here has been type-checked by the config reader; this module only formats
numbers, booleans and names it was given, so nothing from a config file reaches the text
unchecked (names must already match `[a-z][a-z0-9_]*`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Call:
    """`kind(name = value, ...)` with values already checked (int, float, bool or a symbol name)."""

    kind: str
    args: tuple[tuple[str, object], ...]

    def text(self) -> str:
        return f"{self.kind}({', '.join(f'{k} = {value(v)}' for k, v in self.args)})"


@dataclass(frozen=True)
class Symbol:
    name: str


@dataclass
class Decoder:
    """What `moec import hf` writes: a pre-norm RMSNorm decoder stack with dense and MoE layers."""

    name: str
    source: str  # the transformers model type
    dim: int
    eps: float
    attention: Call
    layer_kinds: list[str]  # "dense" | "moe", one per layer
    dense_expert: Call | None = None
    expert: Call | None = None
    num_experts: int = 0
    router: Call | None = None
    shared: tuple[int, Call] | None = None  # (count, expert)
    shared_gate: bool = False
    load_balance: float = 0.0
    notes: list[str] = field(default_factory=list)  # header comment lines


def value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"not a finite number: {v!r}")
        return repr(v)
    if isinstance(v, Symbol) and _NAME.match(v.name):
        return v.name
    raise ValueError(f"cannot write {v!r} into a .moe file")


def _pattern(kinds: list[str]) -> str:
    """The layer stack as `layers { ... }` items: a repeated period when there is one, else runs."""
    names = [f"{k}_layer" for k in kinds]
    n = len(names)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and names == names[:period] * (n // period):
            return f"repeat {n // period} {{ {' '.join(names[:period])} }}"
    items, i = [], 0
    while i < n:
        j = i
        while j < n and names[j] == names[i]:
            j += 1
        items.append(names[i] if j - i == 1 else f"repeat {j - i} {{ {names[i]} }}")
        i = j
    return "; ".join(items)


def write(d: Decoder) -> str:
    if not _NAME.match(d.name):
        raise ValueError(f"not a model name: {d.name!r}")
    out = [f"# Imported by `moec import hf` from a transformers `{d.source}` config.",
           "# The decoder stack from inputs_embeds to last_hidden_state (embeddings and LM head are not part of it).",
           *(f"# {line}" for line in d.notes),
           f"model {d.name} {{",
           f"  const d = {d.dim}",
           "  input(dim = d)",
           ""]
    if d.expert is not None:
        out.append(f"  expert routed_ffn = {d.expert.text()}")
    if d.dense_expert is not None and "dense" in d.layer_kinds:
        out.append(f"  expert dense_ffn = {d.dense_expert.text()}")
    if d.shared is not None:
        out.append(f"  expert shared_ffn = {d.shared[1].text()}")
    norm = f"norm = rms(eps = {value(d.eps)})"
    if "dense" in d.layer_kinds:
        out += ["", "  block dense_layer {", f"    {norm}", f"    {d.attention.text()}", "    dense_ffn", "  }"]
    if "moe" in d.layer_kinds:
        out += ["", "  block moe_layer {", f"    {norm}", f"    {d.attention.text()}", "    moe {",
                f"      experts {d.num_experts} x routed_ffn"]
        if d.shared is not None:
            out.append(f"      shared {d.shared[0]} x shared_ffn")
            if d.shared_gate:
                out.append("      shared_gate = sigmoid")
        out.append(f"      router {d.router.text()}")
        if d.load_balance:
            out.append(f"      loss load_balance({value(d.load_balance)})")
        out += ["    }", "  }"]
    out += ["", f"  layers {{ {_pattern(d.layer_kinds)} }}", "}", ""]
    return "\n".join(out)
