"""The abstract syntax tree of a `.moe` file. Every node carries the SourceLoc it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.diagnostics import SourceLoc


@dataclass
class Node:
    loc: SourceLoc


# ---- expressions ---------------------------------------------------------------------------
@dataclass
class Number(Node):
    value: int | float


@dataclass
class String(Node):
    value: str


@dataclass
class Bool(Node):
    value: bool


@dataclass
class Ref(Node):
    name: str


@dataclass
class BinOp(Node):
    op: str  # one of + - * / // %
    left: Expr
    right: Expr


@dataclass
class Neg(Node):
    operand: Expr


@dataclass
class ListExpr(Node):
    items: list[Expr]


@dataclass
class Arg(Node):
    name: str | None  # None for a positional argument
    value: Expr


@dataclass
class Call(Node):
    """`name(args)`; also a bare `name` where a call is expected (then `has_args` is False)."""

    name: str
    args: list[Arg] = field(default_factory=list)
    has_args: bool = False
    name_loc: SourceLoc | None = None


Expr = Number | String | Bool | Ref | BinOp | Neg | ListExpr | Call


# ---- statements ----------------------------------------------------------------------------
@dataclass
class Name(Node):
    """An identifier with its own location (declarations, modality lists)."""

    name: str


@dataclass
class ConstDef(Node):
    name: Name
    value: Expr


@dataclass
class ModalityDecl(Node):
    names: list[Name]


@dataclass
class InputDecl(Node):
    args: list[Arg]


@dataclass
class ExpertDef(Node):
    name: Name
    params: list[Name]
    body: Call


@dataclass
class Setting(Node):
    name: Name
    value: Expr


@dataclass
class ExpertsDecl(Node):
    count: Expr
    expert: Call
    shared: bool


@dataclass
class RouterDecl(Node):
    router: Call


@dataclass
class LossDecl(Node):
    terms: list[Call]


@dataclass
class Group(Node):
    modalities: list[Name]
    stmts: list[ExpertsDecl | RouterDecl | Setting]


@dataclass
class MoE(Node):
    stmts: list[Group | ExpertsDecl | RouterDecl | LossDecl | Setting]


@dataclass
class BlockDef(Node):
    name: Name
    params: list[Name]
    stmts: list[Setting | MoE | Call]


@dataclass
class LayerRef(Node):
    call: Call


@dataclass
class Repeat(Node):
    count: Expr
    items: list[LayerRef | Repeat]


@dataclass
class Layers(Node):
    items: list[LayerRef | Repeat]


@dataclass
class TargetDecl(Node):
    name: Name
    settings: list[Setting]


@dataclass
class PlacementDecl(Node):
    settings: list[Setting]


@dataclass
class Import(Node):
    path: str


Definition = ConstDef | ExpertDef | BlockDef


@dataclass
class Model(Node):
    name: Name
    stmts: list


@dataclass
class File(Node):
    path: str
    imports: list[Import]
    definitions: list[Definition]
    models: list[Model]
