"""Text -> AST. Lark LALR with positions; syntax errors become diagnostics, never exceptions."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from moec.diagnostics import Diagnostics, SourceLoc, did_you_mean

from . import ast

MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_NESTING = 64

# Human names for the grammar's terminals, for "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "LBRACE": "`{`", "RBRACE": "`}`",
    "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "COMMA": "`,`", "EQUAL": "`=`",
    "SEMICOLON": "`;`", "PLUS": "`+`", "MINUS": "`-`", "STAR": "`*`", "SLASH": "`/`",
    "PERCENT": "`%`", "$END": "end of file",
}
_KEYWORDS = ["model", "const", "modality", "input", "expert", "block", "moe", "group", "experts",
             "shared", "router", "loss", "layers", "repeat", "target", "placement", "import"]


@lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("moec.dsl").joinpath("moe.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _terminal_name(term: str) -> str:
    if term in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[term]
    pattern = _lark().get_terminal(term).pattern
    return f"`{pattern.value}`" if pattern.type == "str" else term.lower()


def _expected(expected) -> str:
    names = sorted({_terminal_name(t) for t in expected})
    if len(names) > 8:
        names = names[:8] + ["..."]
    return ", ".join(names)


def _brackets(text: str):
    """(line, column, character) of each bracket outside comments and strings, in order."""
    line, col = 1, 0
    in_comment = in_string = False
    for ch in text:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
            in_comment = in_string = False
        elif in_comment:
            continue
        elif ch == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif ch == "#":
            in_comment = True
        elif ch in "([{)]}":
            yield line, col, ch


def _nesting_error(text: str, path: str, diags: Diagnostics) -> bool:
    """Report brackets nested deeper than MAX_NESTING (outside comments and strings)."""
    depth = 0
    for line, col, ch in _brackets(text):
        depth += 1 if ch in "([{" else -1
        if depth > MAX_NESTING:
            diags.error("E0104", f"brackets nested more than {MAX_NESTING} deep",
                        SourceLoc(path, line, col, line, col + 1),
                        "no statement needs this depth: close the brackets opened before, or split the "
                        "expression into constants")
            return True
    return False


def _unclosed_bracket(text: str, line: int, col: int) -> tuple[int, int, str] | None:
    """The innermost bracket still open at (line, col): (line, column, character), or None."""
    stack = []
    for at in _brackets(text):
        if at[:2] >= (line, col):
            break
        if at[2] in "([{":
            stack.append(at)
        elif stack:
            stack.pop()
    return stack[-1] if stack else None


def parse(text: str, path: str, diags: Diagnostics) -> ast.File | None:
    """Parse one file's text. Returns None (with diagnostics added) on a syntax error."""
    diags.sources[path] = text
    if _nesting_error(text, path, diags):
        return None
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        _report_syntax_error(exc, path, diags)
        return None
    try:
        return _ToAst(path).transform(tree)
    except (RecursionError, VisitError) as exc:
        if isinstance(exc, VisitError) and not isinstance(exc.orig_exc, RecursionError):
            raise
        line = _longest_expression_line(text)
        diags.error("E0104", "expression nested too deeply", SourceLoc(path, line, 1),
                    "split it into several constants")
        return None


def _longest_expression_line(text: str) -> int:
    """The line with the most operators: where an over-deep expression most likely is."""
    lines = text.splitlines() or [""]
    scores = [sum(line.count(op) for op in "+-*/%(") for line in lines]
    return scores.index(max(scores)) + 1


def _report_syntax_error(exc: UnexpectedInput, path: str, diags: Diagnostics) -> None:
    line = getattr(exc, "line", 1) or 1
    col = getattr(exc, "column", 1) or 1
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        expected = _expected(exc.expected)
        lines = diags.sources[path].splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        diags.error("E0103", "unexpected end of file", SourceLoc(path, line, col, line, col + 1),
                    f"expected {expected}")
    elif isinstance(exc, UnexpectedToken):
        tok = exc.token
        hint = None
        if tok.type == "NAME" or tok.type.startswith("__ANON"):
            hint = did_you_mean(str(tok), _KEYWORDS)
        text = diags.sources[path]
        if hint is None and str(tok) == "*" and 0 < tok.start_pos and text[tok.start_pos - 1] == "*":
            hint = "`**` is not an operator (operators: + - * / // %); write a power out, e.g. 2 * 2 * 2"
        if hint is None and exc.expected & {"RBRACE", "RPAR", "RSQB"}:
            opened = _unclosed_bracket(text, line, col)
            if opened is not None and opened[0] < line:
                closer = {"(": ")", "[": "]", "{": "}"}[opened[2]]
                hint = f"is a `{closer}` missing? the `{opened[2]}` at line {opened[0]}, column {opened[1]} is still open"
        expected = _expected(exc.expected)
        end = col + max(1, len(str(tok)))
        diags.error("E0101", f"unexpected `{_clip(str(tok))}`; expected {expected}",
                    SourceLoc(path, line, col, line, end), hint)
    elif isinstance(exc, UnexpectedCharacters):
        ch = diags.sources[path][exc.pos_in_stream] if exc.pos_in_stream < len(diags.sources[path]) else "?"
        diags.error("E0102", f"unexpected character {ch!r}", SourceLoc(path, line, col, line, col + 1),
                    "names are ASCII letters, digits and `_`; strings use double quotes; comments start with `#`")
    else:  # pragma: no cover - all lark parse errors are UnexpectedInput subclasses above
        diags.error("E0101", "syntax error", SourceLoc(path, line, col))


def _clip(s: str, n: int = 30) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _flatten(items) -> list:
    """`const a = 1, b = 2` yields a list of definitions; splice such lists into their parent."""
    out: list = []
    for it in items:
        out.extend(it) if isinstance(it, list) else out.append(it)
    return out


def _loc_of_token(path: str, tok: Token) -> SourceLoc:
    return SourceLoc(path, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _loc(self, meta) -> SourceLoc:
        if getattr(meta, "empty", True):
            return SourceLoc(self.path, 1, 1)
        return SourceLoc(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(_loc_of_token(self.path, tok), str(tok))

    # ---- top level
    def start(self, meta, items):
        f = ast.File(SourceLoc(self.path, 1, 1), self.path, [], [], [])
        for it in _flatten(items):
            if isinstance(it, ast.Import):
                f.imports.append(it)
            elif isinstance(it, ast.Model):
                f.models.append(it)
            else:
                f.definitions.append(it)
        return f

    def import_stmt(self, meta, c):
        return ast.Import(self._loc(meta), str(c[0])[1:-1])

    def model(self, meta, c):
        return ast.Model(self._loc(meta), self._name(c[0]), _flatten(c[1:]))

    def const_stmt(self, meta, c):
        return list(c)

    def assign(self, meta, c):
        return ast.ConstDef(self._loc(meta), self._name(c[0]), c[1])

    def modality_stmt(self, meta, c):
        return ast.ModalityDecl(self._loc(meta), [self._name(t) for t in c])

    def input_stmt(self, meta, c):
        return ast.InputDecl(self._loc(meta), c[0])

    def params(self, meta, c):
        return [self._name(t) for t in c if t is not None]

    def expert_def(self, meta, c):
        name, *rest = c
        params = rest[0] if len(rest) == 2 else []
        return ast.ExpertDef(self._loc(meta), self._name(name), params or [], rest[-1])

    def block_def(self, meta, c):
        name, *rest = c
        params: list = []
        if rest and isinstance(rest[0], list):
            params = rest.pop(0)
        return ast.BlockDef(self._loc(meta), self._name(name), params, rest)

    def setting(self, meta, c):
        return ast.Setting(self._loc(meta), self._name(c[0]), c[1])

    def moe_stmt(self, meta, c):
        return ast.MoE(self._loc(meta), list(c))

    def group_stmt(self, meta, c):
        names = [self._name(t) for t in c if isinstance(t, Token)]
        stmts = [s for s in c if not isinstance(s, Token)]
        return ast.Group(self._loc(meta), names, stmts)

    def experts_stmt(self, meta, c):
        return ast.ExpertsDecl(self._loc(meta), c[0], c[1], shared=False)

    def shared_stmt(self, meta, c):
        return ast.ExpertsDecl(self._loc(meta), c[0], c[1], shared=True)

    def router_stmt(self, meta, c):
        return ast.RouterDecl(self._loc(meta), c[0])

    def loss_stmt(self, meta, c):
        return ast.LossDecl(self._loc(meta), list(c))

    def layers_stmt(self, meta, c):
        return ast.Layers(self._loc(meta), list(c))

    def layer_ref(self, meta, c):
        call = self.call(meta, c)
        return ast.LayerRef(call.loc, call)

    def repeat(self, meta, c):
        return ast.Repeat(self._loc(meta), c[0], list(c[1:]))

    def target_stmt(self, meta, c):
        return ast.TargetDecl(self._loc(meta), self._name(c[0]), list(c[1:]))

    def placement_stmt(self, meta, c):
        return ast.PlacementDecl(self._loc(meta), list(c))

    # ---- expressions
    def call(self, meta, c):
        name = c[0]
        args = c[1] if len(c) > 1 and c[1] is not None else None
        return ast.Call(self._loc(meta), str(name), args or [], args is not None,
                        _loc_of_token(self.path, name))

    call_expr = call

    def args(self, meta, c):
        return [a for a in c if a is not None]

    def arg(self, meta, c):
        name, value = (c[0], c[1]) if len(c) == 2 else (None, c[0])
        return ast.Arg(self._loc(meta), str(name) if name is not None else None, value)

    def number(self, meta, c):
        text = str(c[0])
        # a literal too large for a float (1e999) becomes inf; the checker rejects non-finite values
        value = int(text) if text.isdigit() else float(text)
        return ast.Number(self._loc(meta), value)

    def string(self, meta, c):
        return ast.String(self._loc(meta), str(c[0])[1:-1])

    def true(self, meta, c):
        return ast.Bool(self._loc(meta), True)

    def false(self, meta, c):
        return ast.Bool(self._loc(meta), False)

    def ref(self, meta, c):
        return ast.Ref(self._loc(meta), str(c[0]))

    def list(self, meta, c):
        return ast.ListExpr(self._loc(meta), [x for x in c if x is not None])

    def neg(self, meta, c):
        return ast.Neg(self._loc(meta), c[0])

    def _bin(op):
        def method(self, meta, c):
            return ast.BinOp(self._loc(meta), op, c[0], c[1])
        return method

    add, sub, mul, div, floordiv, mod = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("//"), _bin("%")
