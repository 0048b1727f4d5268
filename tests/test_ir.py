"""The IR as `moec ir` prints it: FileCheck-style checks, a golden file, and invariants of every pass.

`filecheck(text, patterns)` understands a small subset of LLVM FileCheck:

    CHECK: text         the next line (at or after the last match) containing `text`
    CHECK-NEXT: text    the line right after the last match
    CHECK-SAME: text    further on the line of the last match
    CHECK-NOT: text     no line between the surrounding matches contains `text`
    {{regex}}           a regular expression inside a pattern
    [[NAME:regex]]      capture; later [[NAME]] must match the same text

To rewrite the golden file after an intended change: MOEC_UPDATE_GOLDEN=1 python -m pytest tests/test_ir.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from moec.build import build_graph
from moec.cli import main
from moec.diagnostics import SourceLoc
from moec.driver import compile_model, frontend
from moec.ir import Graph, IRError, TensorType
from moec.ops import AddOp, InputOp, NormOp, OutputOp
from moec.passes import PIPELINES, REGISTRY
from moec.passes.manager import PassContext
from moec.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
EXAMPLE_FILES = sorted(os.path.join(EXAMPLES, f) for f in os.listdir(EXAMPLES) if f.endswith(".moe"))


# ---- filecheck ------------------------------------------------------------------------------------
_DIRECTIVE = re.compile(r"^\s*(?:#|//)?\s*CHECK(?P<kind>-NEXT|-SAME|-NOT)?:\s?(?P<pattern>.*?)\s*$")
_SPECIAL = re.compile(r"\{\{(?P<re>.+?)\}\}|\[\[(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<def>.+?))?\]\]")


class FileCheckError(AssertionError):
    pass


def _compile(pattern: str, variables: dict[str, str]) -> tuple[re.Pattern, list[str]]:
    out, defined, pos = [], [], 0
    for m in _SPECIAL.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        pos = m.end()
        if m["re"] is not None:
            out.append(f"(?:{m['re']})")
        elif m["def"] is not None:
            out.append(f"(?P<{m['name']}>{m['def']})")
            defined.append(m["name"])
        elif m["name"] in defined:
            out.append(f"(?P={m['name']})")
        elif m["name"] in variables:
            out.append(re.escape(variables[m["name"]]))
        else:
            raise FileCheckError(f"undefined variable [[{m['name']}]] in {pattern!r}")
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out)), defined


def filecheck(text: str, patterns: str | list[str]) -> None:
    """Raise FileCheckError unless `text` satisfies the CHECK lines of `patterns` in order."""
    if isinstance(patterns, str):
        patterns = patterns.splitlines()
    directives = []
    for raw in patterns:
        if not raw.strip():
            continue
        m = _DIRECTIVE.match(raw)
        if m is None:
            raise FileCheckError(f"not a CHECK line: {raw!r}")
        directives.append(((m["kind"] or "")[1:] or "CHECK", m["pattern"]))
    if not directives or all(kind == "NOT" for kind, _ in directives):
        raise FileCheckError("no positive CHECK lines")
    lines = text.splitlines()
    variables: dict[str, str] = {}
    line, col = 0, 0  # where the next search starts
    last_line = -1  # line of the last positive match
    nots: list[tuple[str, re.Pattern]] = []

    def fail(msg: str, at: int) -> None:
        lo, hi = max(0, at - 3), min(len(lines), at + 4)
        context = "\n".join(f"{'>' if i == at else ' '} {i + 1:4}: {lines[i]}" for i in range(lo, hi))
        raise FileCheckError(f"{msg}\n{context}")

    def check_nots(start_line: int, start_col: int, end_line: int, end_col: int) -> None:
        for pattern, rx in nots:
            for i in range(start_line, min(end_line, len(lines) - 1) + 1):
                seg = lines[i]
                lo = start_col if i == start_line else 0
                hi = end_col if i == end_line else len(seg)
                if rx.search(seg, lo, hi):
                    fail(f"CHECK-NOT: {pattern!r} matched", i)
        nots.clear()

    for kind, pattern in directives:
        rx, defined = _compile(pattern, variables)
        if kind == "NOT":
            nots.append((pattern, rx))
            continue
        found = None
        if kind == "SAME":
            if last_line < 0:
                raise FileCheckError("CHECK-SAME before any match")
            m = rx.search(lines[last_line], col)
            found = (last_line, m) if m else None
            if not found:
                fail(f"CHECK-SAME: {pattern!r} not found on the matched line", last_line)
        elif kind == "NEXT":
            target = last_line + 1
            m = rx.search(lines[target]) if target < len(lines) else None
            found = (target, m) if m else None
            if not found:
                fail(f"CHECK-NEXT: {pattern!r} not on the line after the last match", min(target, len(lines) - 1))
        else:
            for i in range(line, len(lines)):
                m = rx.search(lines[i], col if i == line else 0)
                if m:
                    found = (i, m)
                    break
            if not found:
                fail(f"CHECK: {pattern!r} not found after line {line + 1}", min(line, len(lines) - 1))
        i, m = found
        check_nots(line, col, i, m.start())
        for name in defined:
            variables[name] = m[name]
        last_line, line, col = i, i, m.end()
    check_nots(line, col, len(lines) - 1, len(lines[-1]) if lines else 0)


def test_filecheck_accepts_and_rejects():
    text = "a = 1\n%0 = norm(%9)\nb = add(%0, %0)\nend"
    filecheck(text, "CHECK: a = 1\nCHECK-NEXT: [[X:%[0-9]+]] = norm\nCHECK-NEXT: add([[X]], [[X]])\nCHECK: end")
    filecheck(text, ["CHECK: norm", "CHECK-SAME: (%9)", "CHECK-NOT: mul", "CHECK: end", "CHECK-NOT: zzz"])
    filecheck(text, "CHECK: {{^}}b = {{[a-z]+}}(")
    bad = [
        "CHECK: end\nCHECK: a = 1",  # order matters
        "CHECK: a = 1\nCHECK-NEXT: add",  # not the next line
        "CHECK: a = 1\nCHECK-NOT: norm\nCHECK: end",  # forbidden in between
        "CHECK: add\nCHECK-NOT: end",  # forbidden after the last match
        "CHECK: [[X:%[0-9]+]] = norm\nCHECK: add(%1",  # literal mismatch
        "CHECK: [[X:%[0-9]+]] = norm([[X]])",  # %0 != %9
        "CHECK: norm\nCHECK-SAME: a = 1",
        "CHECK: [[Y]]",  # undefined variable
        "CHECK-NOT: zzz",  # nothing positive
        "CHECK: a = 1.",  # literal dot
    ]
    for patterns in bad:
        with pytest.raises(FileCheckError):
            filecheck(text, patterns)
    filecheck("x.y", "CHECK: x.y")


# ---- running `moec ir` ------------------------------------------------------------------------------
def ir(capsys, path: str, after: str | None = None) -> str:
    argv = ["ir", path] + (["--after", after] if after else [])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def test_mixtral_after_infer_shapes(capsys):
    filecheck(ir(capsys, example("mixtral.moe"), "infer-shapes"), r"""
CHECK: graph @mixtral {
CHECK-NEXT: [[X:%[0-9]+]], [[MOD:%[0-9]+]], [[TASK:%[0-9]+]] = input() {dim=64, modalities=[default], input_modalities=[default]}
CHECK-SAME: : [T,64] f32 {default}, [T] i64 {default}, [T] i64 {default}  // input
CHECK-NEXT: [[N:%[0-9]+]] = norm([[X]]) {norm=rms, dim=64, eps=1e-05} : [T,64] f32 {default}
CHECK-SAME: // layers.0.attention_norm
CHECK-NEXT: [[A:%[0-9]+]] = attention([[N]]) {dim=64, heads=4, kv_heads=2, head_dim=16, bias=false, causal=true}
CHECK-NEXT: [[R:%[0-9]+]] = add([[X]], [[A]]) : [T,64] f32 {default}  // layers.0.attention_residual
CHECK-NEXT: [[N2:%[0-9]+]] = norm([[R]])
CHECK-NEXT: [[Y:%[0-9]+]], [[AUX:%[0-9]+]], [[CNT:%[0-9]+]] = moe([[N2]], [[MOD]], [[TASK]]) {dim=64, groups=[<modalities=[0],
CHECK-SAME: num_experts=8, expert=<form=glu, dim=64, hidden=224, act=silu, bias=false>,
CHECK-SAME: router=<kind=top_k, k=2, score=softmax, renormalize=true, scale=1.0>
CHECK-SAME: losses=<load_balance=0.02, z_loss=0.0>}
CHECK-SAME: : [T,64] f32 {default}, [] f32, [8] i64
CHECK-SAME: // layers.0.moe
CHECK-NEXT: [[R2:%[0-9]+]] = add([[R]], [[Y]]) {{.*}}// layers.0.moe_residual
CHECK-NOT: router_gate
CHECK-NOT: expert_gemm
CHECK: = moe(
CHECK-SAME: // layers.1.moe
CHECK: [[F:%[0-9]+]] = norm({{%[0-9]+}}) {norm=rms, dim=64, eps=1e-05} : [T,64] f32 {default}  // final_norm
CHECK-NEXT: output([[F]], [[AUX]], [[CNT]], {{%[0-9]+}}, {{%[0-9]+}})  // output
CHECK-NEXT: }
""")


def test_mixtral_after_lower_moe(capsys):
    out = ir(capsys, example("mixtral.moe"), "lower-moe")
    filecheck(out, r"""
CHECK: [[H:%[0-9]+]] = norm({{%[0-9]+}}) {{.*}}// layers.0.moe_norm
CHECK-NEXT: [[L:%[0-9]+]] = router_gate([[H]]) {dim=64, num_experts=8} : [T,8] f32 {default}  // layers.0.moe.router
CHECK-NEXT: [[W:%[0-9]+]], [[I:%[0-9]+]], [[P:%[0-9]+]] = route([[L]]) {router=<kind=top_k, k=2, score=softmax,
CHECK-SAME: : [T,2] f32 {default}, [T,2] i64 {default}, [T,8] f32 {default}
CHECK-NEXT: [[ORD:%[0-9]+]] = sort_by_expert([[I]]) {num_experts=8} : [T*2] i64
CHECK-NEXT: [[CNT:%[0-9]+]] = count_experts([[I]]) {num_experts=8} : [8] i64
CHECK-NEXT: [[OFF:%[0-9]+]] = expert_offsets([[CNT]]) {num_experts=8} : [9] i64
CHECK-NEXT: [[ROWS:%[0-9]+]] = gather_rows([[H]], [[ORD]]) : [T*2,64] f32
CHECK-NEXT: [[UP:%[0-9]+]] = expert_gemm([[ROWS]], [[OFF]]) {num_experts=8, projection=up, in_dim=64, out_dim=224,
CHECK-SAME: : [T*2,224] f32
CHECK-NEXT: [[GATE:%[0-9]+]] = expert_gemm([[ROWS]], [[OFF]]) {{{.*}}projection=gate
CHECK-NEXT: [[ACT:%[0-9]+]] = activation([[GATE]], [[UP]]) {act=silu, glu=true}
CHECK-NEXT: [[DOWN:%[0-9]+]] = expert_gemm([[ACT]], [[OFF]]) {{{.*}}projection=down, in_dim=224, out_dim=64
CHECK-SAME: : [T*2,64] f32
CHECK-NEXT: [[Y:%[0-9]+]] = combine([[DOWN]], [[W]], [[ORD]]) {dim=64} : [T,64] f32
CHECK: [[AUX:%[0-9]+]] = aux_loss([[L]], [[P]], [[I]]) {losses=<load_balance=0.02, z_loss=0.0>, num_experts=8}
CHECK: add({{%[0-9]+}}, [[Y]]) {{.*}}// layers.0.moe_residual
CHECK: output({{%[0-9]+}}, [[AUX]], [[CNT]],
CHECK-NOT: moe(
CHECK-NOT: select_tokens
""")
    assert " moe(" not in out and "select_tokens" not in out and "scatter_tokens" not in out


def test_fuse_router_merges_gate_and_route(capsys):
    out = ir(capsys, example("mixtral.moe"), "fuse-router")
    filecheck(out, r"""
CHECK: [[H:%[0-9]+]] = norm({{%[0-9]+}}) {{.*}}// layers.0.moe_norm
CHECK-NEXT: [[W:%[0-9]+]], [[I:%[0-9]+]], [[P:%[0-9]+]], [[L:%[0-9]+]] = router([[H]]) {dim=64, num_experts=8,
CHECK-SAME: router=<kind=top_k, k=2, score=softmax, renormalize=true, scale=1.0>}
CHECK-SAME: // layers.0.moe.router
CHECK-NEXT: sort_by_expert([[I]])
CHECK: aux_loss([[L]], [[P]], [[I]])
""")
    assert "router_gate(" not in out and "route(" not in out


def test_fuse_permute_merges_sort_counts_offsets(capsys):
    out = ir(capsys, example("mixtral.moe"), "fuse-permute")
    filecheck(out, r"""
CHECK: [[W:%[0-9]+]], [[I:%[0-9]+]], [[P:%[0-9]+]], [[L:%[0-9]+]] = router(
CHECK-NEXT: [[ORD:%[0-9]+]], [[CNT:%[0-9]+]], [[OFF:%[0-9]+]] = permute([[I]]) {num_experts=8, block_m=1}
CHECK-SAME: : [T*2] i64 {default}, [8] i64 {default}, [9] i64 {default}  // layers.0.moe.permute
CHECK-NEXT: gather_rows({{%[0-9]+}}, [[ORD]])
CHECK: expert_gemm({{%[0-9]+}}, [[OFF]])
CHECK: output({{.*}}[[CNT]]
""")
    for gone in ("sort_by_expert(", "count_experts(", "expert_offsets("):
        assert gone not in out


def test_fuse_permute_block_option(capsys):
    out = ir(capsys, example("mixtral.moe"), "fuse-permute{block-m=64}")
    assert "permute(%8) {num_experts=8, block_m=64}" in out or "block_m=64" in out


def test_fuse_expert_gemm_leaves_one_op_per_group(capsys):
    out = ir(capsys, example("moma.moe"))
    filecheck(out, r"""
CHECK: [[X:%[0-9]+]], [[IDX:%[0-9]+]] = select_tokens({{.*}}modality_names=[text]
CHECK-NEXT: [[W:%[0-9]+]], [[I:%[0-9]+]], [[P:%[0-9]+]], [[L:%[0-9]+]] = router([[X]])
CHECK-NEXT: [[ORD:%[0-9]+]], [[CNT:%[0-9]+]], [[OFF:%[0-9]+]] = permute([[I]])
CHECK-NEXT: [[Y:%[0-9]+]] = fused_experts([[X]], [[I]], [[W]], [[ORD]], [[OFF]]) {num_experts=4,
CHECK-SAME: expert=<form=glu, dim=64, hidden=128, act=silu, bias=false>} : [T_text,64] f32 {text}
CHECK-NEXT: scatter_tokens([[Y]], [[IDX]],
CHECK: fused_experts({{.*}}: [T_image,64] f32 {image}  // layers.1.moe.image.experts
""")
    for gone in ("gather_rows(", "expert_gemm(", "activation(", "combine("):
        assert gone not in out
    assert out.count("fused_experts(") == 4  # two sparse layers x two modality groups


def test_moma_after_lower_moe_routes_each_modality_in_its_group(capsys):
    filecheck(ir(capsys, example("moma.moe"), "lower-moe"), r"""
CHECK: [[X:%[0-9]+]], [[MOD:%[0-9]+]], [[TASK:%[0-9]+]] = input()
CHECK: [[H:%[0-9]+]] = norm({{.*}}// layers.1.moe_norm
CHECK-NEXT: [[XT:%[0-9]+]], [[IT:%[0-9]+]] = select_tokens([[H]], [[MOD]]) {modalities=[0], modality_names=[text]}
CHECK-SAME: : [T_text,64] f32 {text}, [T_text] i64 {text}
CHECK-NEXT: router_gate([[XT]]) {dim=64, num_experts=4} : [T_text,4] f32 {text}
CHECK-NEXT: route({{.*}}router=<kind=top_k, k=1,
CHECK: [[YT:%[0-9]+]] = combine({{.*}}: [T_text,64] f32 {text}
CHECK-NEXT: [[ST:%[0-9]+]] = scatter_tokens([[YT]], [[IT]], [[H]]) : [T,64] f32 {text,image}
CHECK-NEXT: aux_loss({{.*}}losses=<load_balance=0.01, z_loss=0.001>
CHECK-NOT: modality_names=[text]
CHECK-NEXT: [[XI:%[0-9]+]], [[II:%[0-9]+]] = select_tokens([[H]], [[MOD]]) {modalities=[1], modality_names=[image]}
CHECK-NEXT: router_gate([[XI]]) {dim=64, num_experts=4} : [T_image,4] f32 {image}
CHECK: [[SI:%[0-9]+]] = scatter_tokens({{%[0-9]+}}, [[II]], [[H]])
CHECK: [[SUM:%[0-9]+]] = add([[ST]], [[SI]]) : [T,64] f32 {text,image}
CHECK-NEXT: add({{%[0-9]+}}, [[SUM]]) {{.*}}// layers.1.moe_residual
CHECK: // layers.2.ffn
CHECK: select_tokens({{.*}}modality_names=[text]
CHECK: select_tokens({{.*}}modality_names=[image]
CHECK: // final_norm
CHECK-NOT: select_tokens
""")


def test_deepseek_dense_first_then_shared_experts(capsys):
    out = ir(capsys, example("deepseek_moe.moe"), "lower-moe")
    filecheck(out, r"""
CHECK: ffn({{%[0-9]+}}) {expert=<form=glu, dim=64, hidden=256, act=silu, bias=false>}{{.*}}// layers.0.ffn
CHECK-NOT: router_gate
CHECK: [[H:%[0-9]+]] = norm({{.*}}// layers.1.moe_norm
CHECK-NEXT: router_gate([[H]]) {dim=64, num_experts=16}
CHECK-NEXT: route({{.*}}k=4
CHECK: expert_gemm({{.*}}projection=up, in_dim=64, out_dim=64
CHECK: [[Y:%[0-9]+]] = combine(
CHECK: aux_loss({{.*}}losses=<load_balance=0.001, z_loss=0.0001>, num_experts=16
CHECK-NEXT: [[S:%[0-9]+]] = ffn([[H]]) {expert=<form=glu, dim=64, hidden=128, act=silu, bias=false>}
CHECK-SAME: // layers.1.moe.shared
CHECK-NEXT: [[T:%[0-9]+]] = add([[Y]], [[S]]) {{.*}}// layers.1.moe.shared_add
CHECK-NEXT: add({{%[0-9]+}}, [[T]]) {{.*}}// layers.1.moe_residual
CHECK: // layers.2.moe.shared
CHECK: // final_norm
""")
    assert out.count("router_gate(") == 2 and out.count("= ffn(") == 3


def test_post_norm_block_and_no_final_norm(tmp_path, capsys):
    path = tmp_path / "pn.moe"
    path.write_text("model pn {\n  input(dim = 8)\n"
                    "  block b { residual = post_norm; norm = layer(eps = 1e-5); attention(heads = 2); mlp(8, 16) }\n"
                    "  layers { repeat 2 { b } }\n}\n")
    out = ir(capsys, str(path))
    filecheck(out, r"""
CHECK: [[X:%[0-9]+]], {{%[0-9]+}}, {{%[0-9]+}} = input()
CHECK-NEXT: [[A:%[0-9]+]] = attention([[X]])
CHECK-NEXT: [[R:%[0-9]+]] = add([[X]], [[A]])
CHECK-NEXT: [[N:%[0-9]+]] = norm([[R]]) {norm=layer, dim=8, eps=1e-05}
CHECK-NEXT: [[F:%[0-9]+]] = ffn([[N]]) {expert=<form=mlp, dim=8, hidden=16, act=gelu, bias=false>}
CHECK-NEXT: [[R2:%[0-9]+]] = add([[N]], [[F]])
CHECK-NEXT: norm([[R2]]) {norm=layer
CHECK: [[LAST:%[0-9]+]] = norm({{.*}}// layers.1.ffn_norm
CHECK-NEXT: output([[LAST]])  // output
CHECK-NOT: final_norm
""")


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=os.path.basename)
def test_default_pipeline_prints_the_lowered_graph(capsys, path):
    default = ir(capsys, path)
    assert default == ir(capsys, path, "fuse-expert-gemm") == ir(capsys, path, "analyze")
    lowered, shaped = ir(capsys, path, "lower-moe"), ir(capsys, path, "infer-shapes")
    if " moe(" in shaped:
        assert default != lowered != shaped
    else:  # a dense model (Mixture-of-Transformers): nothing to lower or fuse
        assert default == lowered == shaped


# ---- golden ------------------------------------------------------------------------------------------
def test_moma_golden(capsys):
    out = ir(capsys, example("moma.moe"))
    golden = os.path.join(GOLDEN, "moma.ir")
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        with open(golden, "w") as fh:
            fh.write(out)
    with open(golden) as fh:
        expected = fh.read()
    assert out == expected, "IR of examples/moma.moe changed; if intended, rerun with MOEC_UPDATE_GOLDEN=1"


def test_golden_is_consistent_with_itself():
    """The golden file is well-formed: SSA values defined once, in order, before use."""
    with open(os.path.join(GOLDEN, "moma.ir")) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "graph @moma {" and lines[-1] == "}"
    defined: list[int] = []
    for line in lines[1:-1]:
        lhs, _, rhs = line.partition(" = ") if " = " in line.split("(")[0] else ("", "", line)
        for used in re.findall(r"%(\d+)", rhs.split("{")[0].split(")")[0]):
            assert int(used) in defined, line
        for value in re.findall(r"%(\d+)", lhs):
            assert int(value) == len(defined), line
            defined.append(int(value))
        assert re.search(r"  // [a-z0-9_.]+$", line), line
    assert len(defined) == 76


# ---- invariants of every pass ------------------------------------------------------------------------
VARIANTS = {
    "post_norm": """model v {
  input(dim = 16)
  block b { residual = post_norm; attention(heads = 2); moe { experts 4 x mlp(16, 8); router top_k(k = 2) } }
  layers { repeat 3 { b } }
}""",
    "groups_shared": """model v {
  modality text, image, audio
  input(dim = 16, modalities = [text, image, audio])
  block d { attention(heads = 4, kv_heads = 2); glu(16, 32) }
  block s {
    attention(heads = 4)
    moe {
      router top_k(k = 2, score = sigmoid)
      group text, audio { experts 4 x glu(16, 8); shared 1 x glu(16, 8) }
      group image { experts 2 x mlp(16, 8, bias = true); router top_k(k = 1) }
      shared 2 x glu(16, 4)
      loss z_loss(0.001)
    }
  }
  layers { d repeat 2 { s d } }
}""",
    "not_all_carried": """model v {
  modality text, image
  input(dim = 16, modalities = [image])
  block s { moe { group image { experts 2 x glu(16, 8); router top_k(k = 1) } } }
  layers { s s }
}""",
}


def _sources(tmp_path) -> list[str]:
    paths = list(EXAMPLE_FILES)
    for name, text in VARIANTS.items():
        p = tmp_path / f"{name}.moe"
        p.write_text(text)
        paths.append(str(p))
    return paths


def test_verify_after_every_pass_and_lower_moe_removes_moe(tmp_path):
    for path in _sources(tmp_path):
        spec = frontend(path)
        graph = build_graph(spec)
        verify(graph)
        n_moe = len(graph.find("moe"))
        assert n_moe == sum(1 for b in spec.layers for s in b.sublayers if s.op.kind == "moe")
        ctx = PassContext()
        for name in PIPELINES["default"]:
            REGISTRY[name]().run(graph, ctx)
            verify(graph)
            if name == "infer-shapes":
                assert all(graph.types(n) is not None for n in graph.nodes()), path
                assert len(graph.find("moe")) == n_moe
            if name == "lower-moe":
                assert graph.find("moe") == [], path
                if n_moe:
                    assert graph.find("router_gate") and graph.find("expert_gemm")
                assert all(graph.types(n) is not None for n in graph.nodes()), path
        assert ctx.results["analysis"]["model"] == spec.name


def test_lower_moe_rewires_the_output_op_once(tmp_path, monkeypatch):
    """The output op reads every MoE layer's aux loss and counts: rewiring it once per layer made
    lowering quadratic in the layer count (1000 layers: 28 s for `moec report`)."""
    path = tmp_path / "deep.moe"
    path.write_text("""model deep {
  input(dim = 8)
  block b { moe { experts 2 x glu(8, 16); router top_k(k = 1); loss load_balance(0.01) } }
  layers { repeat 40 { b } }
}""")
    graph = build_graph(frontend(str(path)))
    ctx = PassContext()
    for name in PIPELINES["default"][:PIPELINES["default"].index("lower-moe")]:
        REGISTRY[name]().run(graph, ctx)
    rewired = []
    monkeypatch.setattr(Graph, "set_inputs", lambda self, node, values, _set=Graph.set_inputs:
                        rewired.append(node) or _set(self, node, values))
    REGISTRY["lower-moe"]().run(graph, ctx)
    verify(graph)
    assert rewired == graph.find("output")
    assert len(graph.inputs(graph.find("output")[0])) >= 1 + 2 * 40  # output, 40 losses and 40 counts


def test_every_op_keeps_a_source_location(tmp_path):
    for path in _sources(tmp_path):
        with open(path) as fh:
            n_lines = len(fh.read().splitlines())
        for stop in ("infer-shapes", "lower-moe", "analyze"):
            comp = compile_model(path, stop_after=stop)
            for node in comp.graph.nodes():
                op = comp.graph.op(node)
                assert isinstance(op.loc, SourceLoc), (stop, op.kind, op.name)
                assert op.loc.path == path, (op.name, op.loc)
                assert 1 <= op.loc.line <= n_lines and op.loc.col >= 1, (op.name, op.loc)


def test_lowered_ops_point_at_their_moe(tmp_path):
    path = example("moma.moe")
    with open(path) as fh:
        text = fh.read()
    moe_line = text[:text.index("moe {")].count("\n") + 1
    comp = compile_model(path)
    lowered = [comp.graph.op(n) for n in comp.graph.nodes() if ".moe." in comp.graph.op(n).name]
    assert lowered and all(op.loc.line == moe_line for op in lowered)
    attention_line = text[:text.index("attention", text.index("block sparse"))].count("\n") + 1
    assert comp.graph.op(comp.graph.find("attention")[1]).loc.line == attention_line


def test_printer_is_deterministic(tmp_path):
    for path in _sources(tmp_path):
        first = compile_model(path).graph.print()
        assert first == compile_model(path).graph.print()
        assert first.endswith("}\n")


def test_printer_is_deterministic_across_processes():
    path = example("moma.moe")
    outs = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        code = f"from moec.driver import compile_model; print(compile_model({path!r}).graph.print(), end='')"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.add(proc.stdout)
    assert len(outs) == 1
    assert outs.pop() == compile_model(path).graph.print()


# ---- the verifier can fail -----------------------------------------------------------------------------
def _tiny() -> tuple[Graph, int, int]:
    g = Graph("t")
    inp = g.add(InputOp(name="input", dim=4, modalities=("default",), input_modalities=("default",)),
                num_outputs=3)
    x, _, _ = g.outputs(inp)
    norm = g.add(NormOp(name="n", norm="rms", dim=4, eps=1e-6), [x])
    out = g.add(OutputOp(name="output"), [g.outputs(norm)[0]], num_outputs=0)
    return g, norm, out


def test_verify_rejects_broken_graphs():
    g, norm, _ = _tiny()
    verify(g)
    REGISTRY["infer-shapes"]().run(g, PassContext())
    verify(g)

    g, norm, _ = _tiny()
    g.add(InputOp(name="input2", dim=4, modalities=("default",), input_modalities=("default",)), num_outputs=3)
    with pytest.raises(IRError, match="exactly one input"):
        verify(g)

    g, norm, _ = _tiny()
    g.add(AddOp(name="bad"), [g.outputs(norm)[0]])  # add needs two inputs
    with pytest.raises(IRError, match="1 inputs, expected 2"):
        verify(g)

    g, norm, _ = _tiny()
    REGISTRY["infer-shapes"]().run(g, PassContext())
    g.set_types(norm, (TensorType(shape=("T", 5)),))  # stored type disagrees with the rule
    with pytest.raises(IRError, match="do not re-infer"):
        verify(g)

    g, norm, _ = _tiny()
    g.set_inputs(norm, [g.outputs(norm)[0]])  # a cycle
    with pytest.raises(IRError, match="cycle"):
        verify(g)


def test_bad_pass_options_are_diagnostics(capsys):
    for after, message in (("fuse-permute{block-m=0}", "block-m must be positive"),
                           ("fuse-permute{blok=3}", "has no option `blok`"),
                           ("fuse-permute{block-m}", "needs a value")):
        assert main(["ir", example("mixtral.moe"), "--after", after]) == 1
        err = capsys.readouterr().err
        assert "error[E0402]" in err and message in err and "Traceback" not in err
