"""Source locations, diagnostics and their rendering.

Every problem moec finds in a `.moe` file is a :class:`Diagnostic` with a code, a message, the
span it is about and an optional hint. Diagnostics are collected (never raised one by one) and
rendered together as::

    model.moe:12:20: error[E0202]: modality `imgae` is not declared
       12 |     group imgae { experts 4 x ffn }
          |           ^^^^^
       = hint: declared modalities: text, image
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One line per code: what kind of problem it is. Tests assert codes, so codes never change meaning.
ERROR_CODES: dict[str, str] = {
    "E0001": "cannot read source file",
    "E0002": "source file is not valid UTF-8 text or is too large",
    "E0101": "syntax error: unexpected token",
    "E0102": "syntax error: unexpected character",
    "E0103": "syntax error: unexpected end of file",
    "E0104": "nesting too deep",
    "E0201": "undeclared name",
    "E0202": "undeclared modality",
    "E0203": "duplicate definition",
    "E0204": "unknown keyword argument or kind",
    "E0205": "wrong argument type or count",
    "E0206": "invalid value",
    "E0207": "non-positive size",
    "E0208": "k exceeds the number of experts",
    "E0209": "modality carried by no input",
    "E0210": "dimension mismatch",
    "E0211": "missing declaration",
    "E0212": "arithmetic error",
    "E0213": "name is reserved",
    "E0220": "construct not allowed in this place",
    "E0301": "import cannot be resolved",
    "E0302": "import cycle",
    "E0401": "unknown compilation target",
    "E0402": "unknown pass or pipeline",
}


@dataclass(frozen=True)
class SourceLoc:
    """A span in a source file; lines and columns are 1-based, end is inclusive-exclusive."""

    path: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    loc: SourceLoc | None = None
    hint: str | None = None
    severity: str = "error"

    def render(self, sources: dict[str, str] | None = None) -> str:
        where = f"{self.loc}: " if self.loc else "moec: "
        lines = [f"{where}{self.severity}[{self.code}]: {self.message}"]
        text = (sources or {}).get(self.loc.path) if self.loc else None
        if text is not None and self.loc is not None:
            src_lines = text.splitlines()
            if 1 <= self.loc.line <= len(src_lines):
                src = src_lines[self.loc.line - 1]
                shown = src[:200]
                width = 1
                if self.loc.end_line == self.loc.line and self.loc.end_col > self.loc.col:
                    width = self.loc.end_col - self.loc.col
                col = min(self.loc.col, len(shown) + 1)
                width = max(1, min(width, len(shown) + 1 - col))
                gutter = f"{self.loc.line:>5} | "
                lines.append(gutter + shown.replace("\t", " "))
                lines.append(" " * (len(gutter) - 2) + "| " + " " * (col - 1) + "^" * width)
        if self.hint:
            lines.append(f"      = hint: {self.hint}")
        return "\n".join(lines)


@dataclass
class Diagnostics:
    """An ordered collection of diagnostics plus the source texts needed to render them."""

    items: list[Diagnostic] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def error(self, code: str, message: str, loc: SourceLoc | None = None, hint: str | None = None) -> None:
        assert code in ERROR_CODES, code
        diag = Diagnostic(code, message, loc, hint)
        if diag not in self.items:
            self.items.append(diag)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

    def render(self) -> str:
        return "\n".join(d.render(self.sources) for d in self.items)


class CompileError(Exception):
    """Raised by the driver when a stage finished with errors; carries all of them."""

    def __init__(self, diagnostics: Diagnostics):
        self.diagnostics = diagnostics
        super().__init__(diagnostics.render())


def did_you_mean(name: str, candidates) -> str | None:
    """A 'did you mean' hint for the closest candidate, or None."""
    import difflib

    cands = sorted(set(candidates))
    close = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return None
