"""Property tests: whatever text `moec.driver.check` is given, it returns Diagnostics and never raises.

Inputs are random text and bytes, and the example files mutated by characters, tokens and lines.
Every property is derandomized (the same examples every run) and stores no database, so a failure
here is reproducible and the tree stays clean.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moec.diagnostics import ERROR_CODES, CompileError, Diagnostics
from moec.driver import check, compile_model, frontend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DIR = os.path.join(ROOT, "examples")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


EXAMPLES = {name: _read(os.path.join(EXAMPLE_DIR, name))
            for name in sorted(os.listdir(EXAMPLE_DIR)) if name.endswith(".moe")}

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|\"[^\"\n]*\"|//|\s+|.",
                      re.DOTALL)
VOCAB = sorted({
    # keywords and kinds
    "model", "const", "modality", "input", "expert", "block", "moe", "group", "experts", "shared",
    "router", "loss", "layers", "repeat", "target", "placement", "import", "x", "true", "false",
    "glu", "mlp", "attention", "top_k", "rms", "layer", "load_balance", "z_loss", "norm", "residual",
    "pre_norm", "post_norm", "silu", "gelu", "softmax", "sigmoid", "dim", "hidden", "heads", "kv_heads",
    "k", "modalities", "text", "image", "default",
    # punctuation
    "{", "}", "(", ")", "[", "]", ",", ";", "=", "+", "-", "*", "/", "//", "%", "#", "\n", " ", '"',
    # awkward values
    "0", "1", "-1", "2", "3.5", "1e-6", "1e400", "99999999999999999999", "0.0", '"a.moe"', '""',
    "import \"missing.moe\"", "\u00e9", "\u2603", "\t", "\r\n",
}) + sorted({t for text in EXAMPLES.values() for t in TOKEN_RE.findall(text) if t.strip()})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _check_text(scratch, data: str | bytes) -> Diagnostics:
    path = scratch / "fuzz.moe"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        with open(path, "w", encoding="utf-8", errors="surrogatepass", newline="") as fh:
            fh.write(data)
    d = check(str(path))
    _well_formed(d, str(path))
    return d


def _well_formed(d: Diagnostics, path: str) -> None:
    assert isinstance(d, Diagnostics)
    assert d.has_errors == bool(d.items)
    for diag in d.items:
        assert diag.code in ERROR_CODES
        assert diag.message and diag.severity == "error"
        if diag.loc is not None:
            assert diag.loc.line >= 1 and diag.loc.col >= 1
            text = d.sources.get(diag.loc.path)
            if text is not None:
                assert diag.loc.line <= max(1, len(text.splitlines()) + 1), diag
    rendered = d.render()
    assert isinstance(rendered, str)
    assert rendered.count("error[") == len(d.items)


# ---- random input ------------------------------------------------------------------------------
GRAMMARISH = st.text(alphabet=st.sampled_from(list("model{}()[]=,;+-*/%#\"x_ab019.eE \n\tk")), max_size=300)


@FUZZ
@given(text=st.one_of(st.text(max_size=400), GRAMMARISH))
def test_random_text_never_raises(scratch, text):
    _check_text(scratch, text)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_never_raise(scratch, data):
    _check_text(scratch, data)


@FUZZ
@given(tokens=st.lists(st.sampled_from(VOCAB), max_size=120))
def test_random_token_soup_never_raises(scratch, tokens):
    _check_text(scratch, " ".join(tokens))


# ---- mutations of the examples ---------------------------------------------------------------------
def _mutate_chars(data, text: str) -> str:
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]), label="op")
        i = data.draw(st.integers(0, len(text)), label="at")
        if op == "delete":
            j = data.draw(st.integers(i, min(len(text), i + 20)), label="to")
            text = text[:i] + text[j:]
        elif op == "insert":
            s = data.draw(st.text(alphabet=st.sampled_from(list("{}()[]=,;+-*/%#\"x0129 \n")) | st.characters(),
                                  min_size=1, max_size=5), label="ins")
            text = text[:i] + s + text[i:]
        else:
            c = data.draw(st.characters(), label="ch")
            text = text[:i] + c + text[i + 1:]
    return text


def _mutate_tokens(data, text: str) -> str:
    toks = TOKEN_RE.findall(text)
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]), label="op")
        i = data.draw(st.integers(0, max(0, len(toks) - 1)), label="at")
        if op == "delete" and toks:
            del toks[i]
        elif op == "insert":
            toks.insert(i, data.draw(st.sampled_from(VOCAB), label="tok"))
        elif op == "replace" and toks:
            toks[i] = data.draw(st.sampled_from(VOCAB), label="tok")
        elif op == "duplicate" and toks:
            j = data.draw(st.integers(i, min(len(toks), i + 12)), label="to")
            toks[i:i] = toks[i:j]
    return "".join(toks)


def _mutate_lines(data, text: str) -> str:
    lines = text.split("\n")
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        op = data.draw(st.sampled_from(["swap", "delete", "duplicate", "reverse"]), label="op")
        i = data.draw(st.integers(0, len(lines) - 1), label="i")
        j = data.draw(st.integers(0, len(lines) - 1), label="j")
        if op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(j, lines[i])
        else:
            lines[i] = lines[i][::-1]
    return "\n".join(lines)


MUTATORS = {"chars": _mutate_chars, "tokens": _mutate_tokens, "lines": _mutate_lines}


@pytest.mark.parametrize("how", sorted(MUTATORS))
@FUZZ
@given(data=st.data())
def test_mutated_examples_never_raise(scratch, how, data):
    name = data.draw(st.sampled_from(sorted(EXAMPLES)), label="example")
    text = MUTATORS[how](data, EXAMPLES[name])
    first = _check_text(scratch, text)
    again = _check_text(scratch, text)
    assert [(x.code, x.message, x.loc) for x in first.items] == [(x.code, x.message, x.loc) for x in again.items]


@FUZZ
@given(data=st.data())
def test_mutants_that_check_also_compile(scratch, data):
    """A mutant `check` accepts must go through the whole pipeline (or fail with diagnostics only)."""
    name = data.draw(st.sampled_from(sorted(EXAMPLES)), label="example")
    how = data.draw(st.sampled_from(sorted(MUTATORS)), label="how")
    text = MUTATORS[how](data, EXAMPLES[name])
    d = _check_text(scratch, text)
    if d.has_errors:
        return
    path = str(scratch / "fuzz.moe")
    try:
        spec = frontend(path)
    except CompileError as exc:
        assert exc.diagnostics.has_errors
        return
    if len(spec.layers) > 64:  # keep the property fast; size is not what it is about
        return
    comp = compile_model(path)
    analysis = comp.results["analysis"]
    assert analysis["params"]["total"] > 0
    assert not comp.graph.find("moe")


def test_examples_themselves_are_clean(scratch):
    for name, text in EXAMPLES.items():
        assert _check_text(scratch, text).items == [], name
