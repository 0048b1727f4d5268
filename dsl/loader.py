"""Reading source files and resolving `import "other.moe"` (relative to the importing file)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from moec.diagnostics import Diagnostics, SourceLoc

from . import ast
from .parser import MAX_SOURCE_BYTES, parse


@dataclass
class Program:
    """The root file and every file it imports, imports first (definition order)."""

    root: ast.File | None
    files: list[ast.File] = field(default_factory=list)


def read_source(path: str, diags: Diagnostics, loc: SourceLoc | None = None) -> str | None:
    try:
        if os.path.isdir(path):
            diags.error("E0001", f"`{path}` is a directory, not a .moe file", loc)
            return None
        if os.path.exists(path) and not os.path.isfile(path):
            diags.error("E0001", f"`{path}` is not a regular file", loc)
            return None
        with open(path, "rb") as fh:
            data = fh.read(MAX_SOURCE_BYTES + 1)
        if len(data) > MAX_SOURCE_BYTES:
            diags.error("E0002", f"`{path}` is larger than the {MAX_SOURCE_BYTES // 2**20} MiB limit", loc)
            return None
    except FileNotFoundError:
        diags.error("E0001", f"no such file: `{path}`", loc)
        return None
    except OSError as exc:
        diags.error("E0001", f"cannot read `{path}`: {exc.strerror or exc}", loc)
        return None
    if b"\x00" in data:
        diags.error("E0002", f"`{path}` is a binary file, not .moe text", loc)
        return None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as exc:
        diags.error("E0002", f"`{path}` is not valid UTF-8 (byte {exc.start})", loc)
        return None


def load_program(path: str, diags: Diagnostics, text: str | None = None) -> Program:
    """Parse `path` (or `text` under that name) and, depth first, everything it imports."""
    program = Program(root=None)
    done: dict[str, ast.File | None] = {}

    def visit(file_path: str, stack: list[str], loc: SourceLoc | None, source: str | None) -> ast.File | None:
        key = os.path.realpath(file_path)
        if key in stack:
            cycle = stack[stack.index(key):] + [key]
            names = " -> ".join(os.path.basename(p) for p in cycle)
            diags.error("E0302", f"import cycle: {names}", loc, "remove one of these imports")
            return None
        if key in done:
            return done[key]
        if source is None:
            source = read_source(file_path, diags, loc)
        file = parse(source, file_path, diags) if source is not None else None
        done[key] = file
        if file is None:
            return None
        for imp in file.imports:
            target = os.path.join(os.path.dirname(file_path), imp.path)
            if not imp.path:
                diags.error("E0301", "empty import path", imp.loc, 'name the file, e.g. `import "common.moe"`')
                continue
            visit(target, stack + [key], imp.loc, None)
        program.files.append(file)
        return file

    program.root = visit(path, [], None, text)
    return program
