"""Diagnostics of the front end: one test per error code, with its line and column, plus rendering
and the `moec check` exit status on hostile inputs.

Expected positions are computed from the source text (`pos(src, needle)`), never copied from moec's
output: a test states where the error *should* point.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys

import pytest
from moec.cli import main
from moec.diagnostics import ERROR_CODES, Diagnostic, Diagnostics, SourceLoc
from moec.driver import check

# A small valid model; most cases below are this with one thing broken.
OK_MODEL = """model m {
  input(dim = 8)
  block b { attention(heads = 2); glu(8, 16) }
  layers { b }
}
"""


# ---- helpers -------------------------------------------------------------------------------------
def write(tmp_path, src: str | bytes, name: str = "m.moe") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        path.write_bytes(src)
    else:
        with open(path, "w", encoding="utf-8", newline="") as fh:  # keep \r\n as written
            fh.write(src)
    return str(path)


def pos(src: str, needle: str, nth: int = 1) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of `needle` in `src`."""
    at = -1
    for _ in range(nth):
        at = src.index(needle, at + 1)
    line = src.count("\n", 0, at) + 1
    col = at - (src.rfind("\n", 0, at) + 1) + 1
    return line, col


def diags_of(tmp_path, src, name: str = "m.moe", **kw) -> tuple[Diagnostics, str]:
    path = write(tmp_path, src, name)
    d = check(path, **kw)
    assert isinstance(d, Diagnostics)
    return d, path


def only(d: Diagnostics, code: str) -> Diagnostic:
    """The single diagnostic of `d`, which must have `code`."""
    assert [x.code for x in d.items] == [code], d.render()
    return d.items[0]


def at(diag: Diagnostic, path: str, line: int, col: int) -> None:
    assert diag.loc is not None, diag
    assert (diag.loc.path, diag.loc.line, diag.loc.col) == (path, line, col), diag.render()


def run_cli(capsys, argv) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- one case per code: (code, source, needle the error must point at, nth occurrence, message part)
CASES = [
    ("E0101", "model m {\n  input(dim = 8))\n}\n", ")\n", 1, "unexpected `)`"),
    ("E0101", "modle m { }\n", "modle", 1, "unexpected `modle`"),
    ("E0101", OK_MODEL.replace("layers { b }", "layers { b } }"), "}\n", 3, "unexpected `}`"),
    ("E0102", "model m {\n  const x = 3 @ 4\n}\n", "@", 1, "unexpected character '@'"),
    ("E0102", "const café = 1\n", "é", 1, "unexpected character 'é'"),
    ("E0104", "const x = " + "(" * 64 + "[1]" + ")" * 64 + "\n", "[", 1, "nested more than 64"),
    ("E0104", OK_MODEL.replace("  layers", "  expert a = bb\n  expert bb = a\n  block c { a }\n  layers")
     .replace("layers { b }", "layers { c }"), "a\n  block c", 1, "nest too deeply"),
    ("E0201", OK_MODEL.replace("layers { b }", "layers { c }"), "c }", 1, "block `c` is not defined"),
    ("E0201", OK_MODEL.replace("  layers", "  const a = zz + 1\n  layers"), "zz", 1, "`zz` is not defined"),
    ("E0201", OK_MODEL.replace("glu(8, 16)", "gloo(8, 16)"), "gloo", 1, "`gloo` is not a sublayer"),
    ("E0203", OK_MODEL.replace("  layers", "  block b { glu(8, 16) }\n  layers"), "b {", 2,
     "block `b` is already defined"),
    ("E0203", OK_MODEL.replace("  layers", "  const n = 1, n = 2\n  layers"), "n = 2", 1,
     "constant `n` is already defined"),
    ("E0204", OK_MODEL.replace("heads = 2", "heads = 2, hedas = 3"), "hedas", 1, "no parameter `hedas`"),
    ("E0204", OK_MODEL.replace("block b {", "block b { resid = 1;"), "resid", 1, "unknown block setting"),
    ("E0205", OK_MODEL.replace("heads = 2", "heads = 2.5"), "heads = 2.5", 1, "must be an integer, got 2.5"),
    ("E0205", OK_MODEL.replace("attention(heads = 2)", "attention"), "attention", 1, "needs `heads`"),
    ("E0205", OK_MODEL.replace("glu(8, 16)", "glu(8, 16, silu, false, full, 2, 4.0, [up], 9)"), "9)", 1,
     "at most 8 arguments"),
    ("E0205", OK_MODEL.replace("glu(8, 16)", "glu(8, 16, dim = 8)"), "dim = 8)", 2, "`dim` given twice"),
    ("E0206", OK_MODEL.replace("glu(8, 16)", "glu(8, 16, act = swish)"), "act = swish", 1,
     "`act` must be one of silu"),
    ("E0206", OK_MODEL.replace("block b {", "block b { residual = sideways;"), "sideways", 1,
     "`residual` must be one of pre_norm, post_norm"),
    ("E0207", OK_MODEL.replace("heads = 2", "heads = 0"), "heads = 0", 1, "must be positive, got 0"),
    ("E0207", OK_MODEL.replace("layers { b }", "layers { repeat 0 { b } }"), "0 {", 1,
     "repeat count must be positive"),
    ("E0208", OK_MODEL.replace("glu(8, 16)", "moe { experts 4 x glu(8, 16); router top_k(k = 5) }"),
     "k = 5", 1, "k = 5 exceeds the 4 experts"),
    ("E0208", OK_MODEL.replace("glu(8, 16)", "moe { experts 4 x glu(8, 16); router top_k(6) }"),
     "6) }", 1, "k = 6 exceeds the 4 experts"),
    ("E0210", OK_MODEL.replace("glu(8, 16)", "glu(16, 16)"), "glu(16", 1, "does not match the model dimension 8"),
    ("E0210", OK_MODEL.replace("heads = 2", "heads = 3"), "attention", 1, "not divisible by heads = 3"),
    ("E0210", OK_MODEL.replace("heads = 2", "heads = 4, kv_heads = 3"), "attention", 1,
     "not a multiple of kv_heads = 3"),
    ("E0211", OK_MODEL.replace("  layers { b }\n", ""), "m {", 1, "model `m` has no layers"),
    ("E0211", OK_MODEL.replace("  input(dim = 8)\n", ""), "m {", 1, "model `m` has no input"),
    ("E0211", OK_MODEL.replace("glu(8, 16)", "moe { experts 4 x glu(8, 16) }"), "moe", 1, "no router"),
    ("E0211", OK_MODEL.replace("layers { b }", "layers { }"), "layers", 1, "the layer stack is empty"),
    ("E0212", OK_MODEL.replace("  layers", "  const z = 1 / 0\n  layers"), "1 / 0", 1, "division by zero"),
    ("E0220", OK_MODEL.replace("glu(8, 16)", "identity"), "identity", 1, "belongs in a routed pool"),
    ("E0212", OK_MODEL.replace("  layers", "  const z = 7 % (2 - 2)\n  layers"), "7 %", 1, "division by zero"),
    ("E0212", OK_MODEL.replace("  layers", "  const z = 10 // 0\n  layers"), "10 //", 1, "division by zero"),
    ("E0301", 'import ""\n' + OK_MODEL, 'import ""', 1, "empty import path"),
]


@pytest.mark.parametrize("code,src,needle,nth,message", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_code_line_and_column(tmp_path, code, src, needle, nth, message):
    d, path = diags_of(tmp_path, src)
    diag = only(d, code)
    line, col = pos(src, needle, nth)
    at(diag, path, line, col)
    assert message in diag.message
    assert diag.severity == "error"
    assert ERROR_CODES[code]


def test_every_front_end_code_has_a_case():
    covered = {c[0] for c in CASES} | {
        "E0001", "E0002", "E0103", "E0202", "E0209", "E0213", "E0302",  # tested separately below
        "E0401", "E0402",  # CLI
    }
    assert covered == set(ERROR_CODES)


# ---- codes needing more than one file or a special input -----------------------------------------
def test_e0001_missing_root_file(tmp_path):
    path = str(tmp_path / "absent.moe")
    d = check(path)
    diag = only(d, "E0001")
    assert diag.loc is None  # no text to point into; the message names the file
    assert path in diag.message


def test_e0001_directory(tmp_path):
    (tmp_path / "dir.moe").mkdir()
    d = check(str(tmp_path / "dir.moe"))
    assert "directory" in only(d, "E0001").message


def test_e0001_missing_import_points_at_the_import(tmp_path):
    src = 'const a = 1\nimport "lib/nope.moe"\n' + OK_MODEL
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0001")
    at(diag, path, *pos(src, "import"))
    assert "nope.moe" in diag.message
    assert (diag.loc.end_line, diag.loc.end_col) == (2, len('import "lib/nope.moe"') + 1)


@pytest.mark.parametrize("data,what", [
    (bytes(range(256)) * 4, "binary"),
    (b"const x = 1  # caf\xe9\n", "UTF-8"),
    (b"\xff\xfe\x00m\x00o", "binary"),
])
def test_e0002_not_text(tmp_path, data, what):
    d, path = diags_of(tmp_path, data)
    diag = only(d, "E0002")
    assert what in diag.message and path in diag.message


def test_e0002_too_large(tmp_path):
    path = tmp_path / "big.moe"
    with open(path, "wb") as fh:
        fh.truncate(5 * 2**20)  # sparse: the size check must come before reading
    diag = only(check(str(path)), "E0002")
    assert "MiB" in diag.message and "limit" in diag.message


def test_e0002_in_an_import_points_at_the_import(tmp_path):
    write(tmp_path, b"\x00\x01\x02", "bin.moe")
    src = 'import "bin.moe"\n' + OK_MODEL
    d, path = diags_of(tmp_path, src)
    at(only(d, "E0002"), path, 1, 1)


def test_e0103_unexpected_end_of_file(tmp_path):
    src = "model m {\n  input(dim = 8)\n"
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0103")
    at(diag, path, 2, len("  input(dim = 8)") + 1)  # just past the last character
    assert diag.hint.startswith("expected ")


def test_e0103_mid_expression(tmp_path):
    src = "const x = 1 +"
    d, path = diags_of(tmp_path, src)
    at(only(d, "E0103"), path, 1, 14)


def test_e0101_hint_names_the_bracket_left_open(tmp_path):
    src = """model m {
  input(dim = 8)
  block b { moe { experts 2 x glu(8, 16); router top_k(k = 1) }
  layers { b }
}
"""
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0101")
    at(diag, path, 4, 10)
    assert diag.hint == "is a `}` missing? the `{` at line 3, column 11 is still open"


def test_e0101_power_operator_hint(tmp_path):
    d, path = diags_of(tmp_path, "const z = 10 ** 4")
    diag = only(d, "E0101")
    at(diag, path, 1, 15)
    assert "`**` is not an operator" in diag.hint


@pytest.mark.parametrize(("count", "code", "hint"), [
    ("2.5", "E0205", "e.g. `repeat 4 { my_block }` (`//` divides to an integer)"),
    ("-3", "E0207", "e.g. `repeat 4 { my_block }`"),
])
def test_repeat_count_hint_shows_a_repeat(tmp_path, count, code, hint):
    src = f"model m {{ input(dim = 8); block b {{ glu(8, 16) }}; layers {{ repeat {count} {{ b }} }} }}"
    d, _ = diags_of(tmp_path, src)
    assert only(d, code).hint == hint


def test_e0202_undeclared_modality_in_group_with_hint(tmp_path):
    src = """model m {
  modality text, image
  input(dim = 8, modalities = [text, image])
  block b {
    moe {
      group text { experts 2 x glu(8, 16); router top_k(k = 1) }
      group imgae { experts 2 x glu(8, 16); router top_k(k = 1) }
    }
  }
  layers { b }
}
"""
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0202")
    at(diag, path, *pos(src, "imgae"))
    assert diag.loc.end_col - diag.loc.col == len("imgae")
    assert "modality `imgae` is not declared" in diag.message
    assert "declared: text, image" in diag.hint
    assert "did you mean `image`?" in diag.hint


def test_e0202_undeclared_modality_in_input(tmp_path):
    src = "model m {\n  modality text\n  input(dim = 8, modalities = [text, audio])\n" \
          "  block b { glu(8, 16) }\n  layers { b }\n}\n"
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0202")
    at(diag, path, *pos(src, "audio"))
    assert "declared: text" in diag.hint


def test_e0209_modality_carried_by_no_input(tmp_path):
    src = """model m {
  modality text, image
  input(dim = 8, modalities = [text])
  block b {
    moe {
      group text { experts 2 x glu(8, 16); router top_k(k = 1) }
      group image { experts 2 x glu(8, 16); router top_k(k = 1) }
    }
  }
  layers { b }
}
"""
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0209")
    at(diag, path, *pos(src, "image {"))
    assert "image" in diag.message and "text" in diag.hint


def test_e0211_file_without_model_when_a_model_is_required(tmp_path):
    d, path = diags_of(tmp_path, "const a = 1\n", require_model=True)
    at(only(d, "E0211"), path, 1, 1)


def test_e0211_modality_without_group(tmp_path):
    src = OK_MODEL.replace("input(dim = 8)", "modality text, image\n  input(dim = 8)").replace(
        "glu(8, 16)", "moe { group text { experts 2 x glu(8, 16); router top_k(k = 1) } }")
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0211")
    at(diag, path, *pos(src, "moe {"))
    assert "`image`" in diag.message


def test_e0302_import_cycle(tmp_path):
    write(tmp_path, 'import "b.moe"\nconst x = 1\n', "a.moe")
    write(tmp_path, 'import "a.moe"\nconst y = 2\n', "b.moe")
    d = check(str(tmp_path / "a.moe"))
    diag = only(d, "E0302")
    at(diag, str(tmp_path / "b.moe"), 1, 1)
    assert "a.moe -> b.moe -> a.moe" in diag.message


def test_e0302_self_import(tmp_path):
    src = 'import "./self.moe"\n'
    d, path = diags_of(tmp_path, src, "self.moe")
    at(only(d, "E0302"), path, 1, 1)


def test_e0401_unknown_target(tmp_path, capsys):
    path = write(tmp_path, OK_MODEL)
    rc, _, err = run_cli(capsys, ["compile", path, "--target", "nope", "-o", str(tmp_path / "out")])
    assert rc == 1
    assert "error[E0401]: unknown target `nope`" in err
    assert "pytorch" in err  # the hint lists the targets
    assert not (tmp_path / "out").exists()


def test_e0402_unknown_pass(tmp_path, capsys):
    path = write(tmp_path, OK_MODEL)
    rc, out, err = run_cli(capsys, ["ir", path, "--after", "nope"])
    assert rc == 1 and out == ""
    assert "error[E0402]: unknown pass `nope`" in err
    rc, _, err = run_cli(capsys, ["ir", path, "--after", "lower-mo"])
    assert rc == 1 and "did you mean `lower-moe`?" in err


def test_e0213_name_is_reserved(tmp_path):
    src = OK_MODEL.replace("  layers", "  expert glu = glu(8, 16)\n  layers")
    d, path = diags_of(tmp_path, src)
    reserved = [x for x in d.items if x.code == "E0213"]
    assert reserved, d.render()
    at(reserved[0], path, *pos(src, "glu ="))


# ---- rendering -----------------------------------------------------------------------------------
def test_render_format_with_source_line_caret_and_hint(tmp_path):
    src = """model m {
  input(dim = 8)
  block b {
    moe { experts 4 x glu(8, 16); router top_kk(k=2) }
  }
  layers { b }
}
"""
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0204")
    line, col = pos(src, "top_kk")
    at(diag, path, line, col)
    assert diag.hint == "did you mean `top_k`?"
    src_line = src.splitlines()[line - 1]
    assert d.render() == "\n".join([
        f"{path}:{line}:{col}: error[E0204]: unknown router `top_kk`",
        f"    {line} | {src_line}",
        "      | " + " " * (col - 1) + "^" * len("top_kk"),
        "      = hint: did you mean `top_k`?",
    ])


def test_render_regex_and_caret_for_every_positioned_case(tmp_path):
    pattern = re.compile(r"^(?P<path>.+):(?P<line>\d+):(?P<col>\d+): error\[(?P<code>E\d{4})\]: (?P<msg>.+)$")
    for i, (code, src, needle, nth, message) in enumerate(CASES):
        d, path = diags_of(tmp_path, src, f"case{i}.moe")
        lines = d.render().splitlines()
        m = pattern.match(lines[0])
        assert m, lines[0]
        line, col = pos(src, needle, nth)
        assert (m["path"], int(m["line"]), int(m["col"]), m["code"]) == (path, line, col, code)
        assert lines[1] == f"{line:>5} | {src.splitlines()[line - 1]}"
        caret = lines[2]
        assert caret.startswith("      | ")
        assert caret.index("^") - len("      | ") == col - 1, d.render()
        assert set(caret[len("      | "):].strip()) == {"^"}


def test_render_without_location_and_the_error_count(tmp_path, capsys):
    path = str(tmp_path / "absent.moe")
    rc, out, err = run_cli(capsys, ["check", path])
    assert rc == 1 and out == ""
    assert err.splitlines() == [f"moec: error[E0001]: no such file: `{path}`", "moec: 1 error"]


def test_render_tabs_keep_the_caret_aligned():
    diag = Diagnostic("E0201", "`zz` is not defined", SourceLoc("t.moe", 1, 12, 1, 14))
    text = "const\ta = \tzz\n"
    assert diag.render({"t.moe": text}).splitlines()[1:] == [
        "    1 | const a =  zz",
        "      | " + " " * 11 + "^^",
    ]


def test_render_caret_at_end_of_line_and_past_it():
    text = "const x = 1 +\n"
    diag = Diagnostic("E0103", "unexpected end of file", SourceLoc("t.moe", 1, 14, 1, 15))
    assert diag.render({"t.moe": text}).splitlines()[2] == "      | " + " " * 13 + "^"
    diag = Diagnostic("E0103", "x", SourceLoc("t.moe", 7, 1))  # line out of range: no source shown
    assert diag.render({"t.moe": text}) == "t.moe:7:1: error[E0103]: x"


def test_message_has_no_stray_whitespace(tmp_path):
    src = OK_MODEL.replace("input(dim = 8)", "input()")
    d, _path = diags_of(tmp_path, src)
    for diag in d.items:
        assert diag.message == diag.message.strip(), repr(diag.message)


def test_undefined_constant_hint(tmp_path):
    src = OK_MODEL.replace("  input(dim = 8)", "  const width = 8\n  input(dim = widht)")
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0201")
    at(diag, path, *pos(src, "widht"))
    assert diag.hint == "did you mean `width`?"


def test_duplicate_hint_names_the_first_definition(tmp_path):
    src = OK_MODEL.replace("  layers", "  block b { glu(8, 16) }\n  layers")
    d, path = diags_of(tmp_path, src)
    line, col = pos(src, "b {")
    assert only(d, "E0203").hint == f"first defined at {path}:{line}:{col}"


def test_keyword_typo_hint(tmp_path):
    d, _path = diags_of(tmp_path, "modle m { }\n")
    assert only(d, "E0101").hint == "did you mean `model`?"


def test_errors_in_imported_file_render_that_file(tmp_path):
    write(tmp_path, "const a = 1\nconst b = a +* 2\n", "lib/defs.moe")
    src = 'import "lib/defs.moe"\n' + OK_MODEL
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0101")
    lib = os.path.join(os.path.dirname(path), "lib/defs.moe")
    at(diag, lib, 2, 14)
    assert d.render().splitlines()[1] == "    2 | const b = a +* 2"


# ---- several errors in one file --------------------------------------------------------------------
def test_several_errors_are_all_reported(tmp_path):
    src = """model m {
  modality text, image
  input(dim = 8, modalities = [text, image])
  const z = 1 / 0
  const w = nope * 2
  const a2 = 1, a2 = 2
  block a { attention(heads = 3); glu(8, 16, act = swish) }
  block s {
    moe {
      group text { experts 4 x glu(8, 16); router top_k(k = 9) }
      group imgae { experts 4 x glu(8, 16); router top_k(k = 1) }
    }
  }
  layers { a s missing }
}
"""
    d, path = diags_of(tmp_path, src)
    got = sorted((x.code, x.loc.line, x.loc.col) for x in d.items)
    want = sorted([
        ("E0212", *pos(src, "1 / 0")),
        ("E0201", *pos(src, "nope")),
        ("E0203", *pos(src, "a2 = 2")),
        ("E0210", *pos(src, "attention")),
        ("E0206", *pos(src, "act = swish")),
        ("E0208", *pos(src, "k = 9")),
        ("E0202", *pos(src, "imgae")),
        ("E0201", *pos(src, "missing")),
    ])
    assert got == want, d.render()
    assert all(x.loc.path == path for x in d.items)
    rendered = d.render()
    assert rendered.count("error[") == len(want)


def test_each_diagnostic_reported_once(tmp_path):
    # the same broken block used three times is one error, not three
    src = OK_MODEL.replace("heads = 2", "heads = 0").replace("layers { b }", "layers { b b repeat 3 { b } }")
    d, path = diags_of(tmp_path, src)
    at(only(d, "E0207"), path, *pos(src, "heads = 0"))


# ---- CRLF and unicode keep positions right --------------------------------------------------------------
def test_crlf_positions(tmp_path):
    src = OK_MODEL.replace("glu(8, 16)", "glu(8, 16, act = swish)").replace("\n", "\r\n")
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0206")
    at(diag, path, *pos(src, "act = swish"))
    assert "\r" not in d.render()


def test_crlf_syntax_error_position(tmp_path):
    src = "model m {\r\n  input(dim = 8\r\n  layers { b }\r\n}\r\n"
    d, path = diags_of(tmp_path, src)
    at(only(d, "E0101"), path, 3, 3)


def test_unicode_comment_does_not_shift_columns(tmp_path):
    src = "# ünïcödé — ✓ 模型\n" + OK_MODEL.replace("heads = 2", "heads = 0")
    d, path = diags_of(tmp_path, src)
    at(only(d, "E0207"), path, *pos(src, "heads = 0"))


def test_unicode_before_the_error_on_the_same_line(tmp_path):
    src = 'model m {\n  const s = "ünï✓", t = ✓\n}\n'
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0102")
    at(diag, path, *pos(src, "✓", 2))
    assert "'✓'" in diag.message


# ---- `moec check`: exit status, and never a traceback ----------------------------------------------------
def _nested(depth: int) -> str:
    return OK_MODEL.replace("  layers", "  const x = " + "(" * depth + "1" + ")" * depth + "\n  layers")


HOSTILE = {
    # name: (file contents or a callable making the path, expected exit status)
    "empty": ("", 1),  # defines no model: E0211, as compile and report say
    "only_comments": ("# nothing here\n\n# at all\n", 1),
    "binary": (bytes(range(256)) * 64, 1),
    "invalid_utf8": (b"\xc3\x28\xa0\xa1" * 100, 1),
    "random_utf8_garbage": ("}{)(][;;,,==" * 50 + "\u2603\u00e9", 1),
    "ten_megabytes": (("# " + "x" * 77 + "\n") * (10 * 2**20 // 80), 1),
    "nested_parens_500": (_nested(500), 1),
    "nested_braces_500": ("model m {" * 500 + "}" * 500, 1),
    "python_cpp_keywords": ("""model m {
  modality int, float
  input(dim = 8, modalities = [int, float])
  const def = 3, class_ = def, while = 2, return = 1, None = 2, nullptr = 4, template = 8
  expert lambda = glu(8, 16)
  block class {
    attention(heads = while)
    moe {
      group int { experts 2 x lambda; router top_k(k = return) }
      group float { experts 2 x lambda; router top_k(k = 1) }
    }
  }
  block def2 { attention(heads = 2); lambda }
  layers { class def2 }
}
""", 0),
    "moe_words_as_names": (("model model {\n  input(dim = 8)\n  const const = 8\n"
                            "  block block { attention(heads = 2); glu(const, 16) }\n  layers { block }\n}\n"), 0),
    "unicode_comment": ("# 模型 ✓ ünïcödé\n" + OK_MODEL, 0),
    "unicode_identifier": (OK_MODEL.replace("block b", "block bé").replace("{ b }", "{ bé }"), 1),
    "crlf_ok": (OK_MODEL.replace("\n", "\r\n"), 0),
    "crlf_error": (OK_MODEL.replace("heads = 2", "heads = 0").replace("\n", "\r\n"), 1),
    "lone_cr": (OK_MODEL.replace("\n", "\r"), 0),
    "nul_in_middle": (OK_MODEL[:20] + "\x00" + OK_MODEL[20:], 1),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_check_exit_status_and_no_traceback(tmp_path, capsys, name):
    content, status = HOSTILE[name]
    path = write(tmp_path, content, f"{name}.moe")
    rc, out, err = run_cli(capsys, ["check", path])
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == status, err
    if status == 0:
        assert out == f"{path}: ok\n" and err == ""
    else:
        assert re.search(r"error\[E\d{4}\]", err) and err.rstrip().endswith(("1 error", "errors"))


def test_check_hundred_thousand_term_sum(tmp_path, capsys):
    src = OK_MODEL.replace("  layers", "  const x = " + "+".join(["1"] * 100_000) + "\n  layers")
    path = write(tmp_path, src)
    rc, _, err = run_cli(capsys, ["check", path])
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc in (0, 1)
    if rc == 1:  # refusing it is fine, but then the error points at the expression's line
        assert re.search(rf"{re.escape(path)}:\d+:\d+: error\[E0104\]", err), err


def test_check_byte_order_mark(tmp_path, capsys):
    path = write(tmp_path, "\ufeff" + OK_MODEL)
    rc, _, err = run_cli(capsys, ["check", path])
    assert rc in (0, 1) and "Traceback" not in err and "internal error" not in err


def test_check_directory_missing_file_and_quiet(tmp_path, capsys):
    (tmp_path / "d.moe").mkdir()
    rc, _, err = run_cli(capsys, ["check", str(tmp_path / "d.moe")])
    assert rc == 1 and "error[E0001]" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, ["check", str(tmp_path / "gone.moe")])
    assert rc == 1 and "error[E0001]" in err and "Traceback" not in err
    ok = write(tmp_path, OK_MODEL)
    rc, out, err = run_cli(capsys, ["check", "-q", ok])
    assert (rc, out, err) == (0, "", "")


def test_check_several_files_fails_if_any_fails(tmp_path, capsys):
    ok = write(tmp_path, OK_MODEL, "ok.moe")
    bad = write(tmp_path, OK_MODEL.replace("heads = 2", "heads = 0"), "bad.moe")
    rc, out, err = run_cli(capsys, ["check", ok, bad, ok])
    assert rc == 1
    assert out.count(": ok") == 2 and "bad.moe" in err and "E0207" in err


def test_check_import_cycle_and_missing_import(tmp_path, capsys):
    write(tmp_path, 'import "b.moe"\n', "a.moe")
    write(tmp_path, 'import "a.moe"\n', "b.moe")
    rc, _, err = run_cli(capsys, ["check", str(tmp_path / "a.moe")])
    assert rc == 1 and "E0302" in err and "Traceback" not in err
    path = write(tmp_path, 'import "missing.moe"\n' + OK_MODEL, "c.moe")
    rc, _, err = run_cli(capsys, ["check", path])
    assert rc == 1 and "E0001" in err and "missing.moe" in err and "Traceback" not in err


def test_check_import_directory_and_binary(tmp_path, capsys):
    (tmp_path / "sub.moe").mkdir()
    write(tmp_path, b"\x00garbage", "bin.moe")
    path = write(tmp_path, 'import "sub.moe"\nimport "bin.moe"\n' + OK_MODEL)
    rc, _, err = run_cli(capsys, ["check", path])
    assert rc == 1 and "E0001" in err and "E0002" in err and "Traceback" not in err


def test_report_and_ir_on_broken_input_exit_1(tmp_path, capsys):
    path = write(tmp_path, OK_MODEL.replace("heads = 2", "heads = 0"))
    for argv in (["report", path], ["report", path, "--json"], ["ir", path], ["ir", path, "--after", "lower-moe"]):
        rc, out, err = run_cli(capsys, argv)
        assert rc == 1 and out == "" and "E0207" in err and "Traceback" not in err


def test_report_on_file_without_model(tmp_path, capsys):
    path = write(tmp_path, "const a = 1\n")
    rc, _, err = run_cli(capsys, ["report", path])
    assert rc == 1 and "E0211" in err


# ---- product bugs (see the reasons) ------------------------------------------------------------------
@pytest.mark.parametrize("layers", ["repeat 100000000000000000000000 { missing }",
                                    "repeat 100000000000000000000000 { repeat 0 { b } }"])
def test_huge_repeat_of_an_erroneous_body_is_a_diagnostic(tmp_path, layers):
    src = OK_MODEL.replace("layers { b }", "layers { " + layers + " }")
    d, _path = diags_of(tmp_path, src)  # must not raise
    assert d.has_errors


def test_long_sums_never_raise(tmp_path):
    # the depth at which the AST transformer runs out of stack depends on the caller's stack, so
    # sweep lengths around it (one of them raises VisitError at the time of writing)
    for n in range(300, 650):
        src = OK_MODEL.replace("  layers", "  const x = " + "+".join(["1"] * n) + "\n  layers")
        path = write(tmp_path, src)
        d = check(path)
        assert isinstance(d, Diagnostics)


def test_deep_expression_error_points_at_the_expression(tmp_path):
    src = OK_MODEL.replace("  layers", "  const x = " + "-" * 3000 + "1\n  layers")
    d, _path = diags_of(tmp_path, src)
    diag = only(d, "E0104")
    assert diag.loc.line == pos(src, "const x")[0]


def test_brackets_in_comments_and_strings_are_not_nesting(tmp_path):
    src = "# " + "(" * 100 + "\n" + OK_MODEL.replace("  layers", '  const s = "' + "[" * 100 + '"\n  layers')
    d, _path = diags_of(tmp_path, src)
    assert d.items == [], d.render()


@pytest.mark.parametrize("use", ["e(16, w = 32)", "e(w = 16, w = 32)"])
def test_user_definition_argument_given_twice(tmp_path, use):
    src = OK_MODEL.replace("  layers", "  expert e(w) = glu(8, w)\n  layers").replace("glu(8, 16)", use)
    d, path = diags_of(tmp_path, src)
    diag = only(d, "E0205")
    at(diag, path, *pos(src, "w = 32"))
    assert "given twice" in diag.message


@pytest.mark.parametrize("expr,needle", [("1e308 * 10", "1e308"), ("1e308 * 10 - 1e308 * 10", "1e308")])
def test_float_overflow_is_an_arithmetic_error(tmp_path, expr, needle):
    src = OK_MODEL.replace("  layers", f"  const x = {expr}\n  layers")
    d, _path = diags_of(tmp_path, src)
    assert d.items and {x.code for x in d.items} == {"E0212"}, d.render()
    assert d.items[0].loc.line == pos(src, needle)[0]


def _limit_memory():  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_device_is_refused(tmp_path):
    path = write(tmp_path, 'import "/dev/zero"\n' + OK_MODEL)
    code = f"import sys; from moec.cli import main; sys.exit(main(['check', {path!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], check=False, preexec_fn=_limit_memory,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"error\[E000[12]\]", proc.stderr)


@pytest.mark.parametrize("src,hint", [
    (OK_MODEL.replace("input(dim = 8)", "input(dim = 8)\n  input(dim = 8)"), "declared at line 2"),
    (OK_MODEL.replace("heads = 2", "heads = nl"), "const nl = 4"),
    (OK_MODEL.replace("heads = 2", "heads = 0"), "attention(heads"),
    (OK_MODEL.replace("heads = 2", "heads = 2, heads = 2"), "give each parameter once"),
    (OK_MODEL.replace("heads = 2", "heads = 2 / 0"), "divisor"),
    (OK_MODEL.replace("glu(8, 16)", "moe { experts 0 x glu(8, 16); router top_k(k = 1) }"), "experts 8 x"),
])
def test_common_mistakes_come_with_a_hint(tmp_path, src, hint):
    d, _ = diags_of(tmp_path, src)
    assert d.items and all(item.hint for item in d.items), d.render()
    assert any(hint in item.hint for item in d.items), d.render()


@pytest.mark.parametrize(("memory", "message"), [("abc", "invalid memory size 'abc'"),
                                                 ("0GB", "invalid memory size '0GB': must be positive")])
def test_placement_memory_is_checked(tmp_path, memory, message):
    src = ("model m { input(dim = 8); block b { moe { experts 4 x glu(8, 16); router top_k(k = 1) } }; layers { b }; "
           f'placement {{ memory = "{memory}" }} }}')
    d, _ = diags_of(tmp_path, src)
    diag = only(d, "E0205")
    assert diag.message == message and "80GB" in diag.hint
