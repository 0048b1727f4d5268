"""HLS backend: emitted project structure, knob diagnostics, and C simulation (g++ against the
ap_types headers) compared with the PyTorch backend.

Tolerance: `moec.backends.hls.simulate.tolerance` -- 16 x (activation LSB + weight LSB) per block plus
4 activation LSBs, i.e. about 5e-3 per block at the default fixed(20, 8) activations and
fixed(18, 4) weights, on outputs of unit scale (the models end in a norm). Measured errors are
about 1e-3.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from moec.backends import BackendError
from moec.backends.hls import csim, estimate, format_estimate, project_for
from moec.backends.hls.names import c_identifier, top_identifier
from moec.backends.hls.render import render
from moec.backends.hls.simulate import available, tolerance
from moec.cli import main
from moec.driver import compile_model

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
needs_toolchain = pytest.mark.skipif(not available(), reason="needs g++ and the ap_types headers "
                                                             "(pip install --no-deps hls4ml==1.3.0)")


def example(name: str) -> str:
    if name == "task_experts":  # needs task ids, so it lives apart from the generic examples
        return os.path.join(EXAMPLES, "hls", f"{name}.moe")
    return os.path.join(EXAMPLES, f"{name}.moe")


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.moe"
    path.write_text(text)
    return str(path)


# ---- emitted project ---------------------------------------------------------------------

def test_compile_writes_the_project_with_pragmas_part_and_clock(tmp_path):
    out = tmp_path / "out"
    assert main(["compile", example("task_experts"), "--target", "hls", "-o", str(out)]) == 0
    name = "task_experts"
    for rel in (f"firmware/{name}.cpp", f"firmware/{name}.h", "firmware/defines.h", "firmware/parameters.h",
                f"tb/{name}_tb.cpp", "bridge.cpp", "build_lib.sh", "build_prj.tcl", "README.md",
                "tb_data/tb_input.txt", "tb_data/tb_expected.txt"):
        assert (out / rel).is_file(), rel
    assert list((out / "firmware" / "weights").glob("*.txt"))
    top = (out / f"firmware/{name}.cpp").read_text()
    for pragma in ("#pragma HLS INTERFACE m_axi port=x", "#pragma HLS INTERFACE s_axilite port=return",
                   "#pragma HLS ARRAY_PARTITION", "moec::route_fixed<3, moec::BY_TASK>"):
        assert pragma in top
    kernels = (out / "firmware/moec_kernels.h").read_text()
    assert "#pragma HLS PIPELINE II=C::reuse" in kernels
    defines = (out / "firmware/defines.h").read_text()
    assert "typedef ap_fixed<20, 8, AP_RND, AP_SAT> act_t;" in defines
    assert "typedef ap_fixed<32, 12, AP_TRN, AP_SAT> accum_t;" in defines
    assert "_r2" in (out / "firmware/parameters.h").read_text()  # reuse = 2 from the target section
    tcl = (out / "build_prj.tcl").read_text()
    assert "set part xcu250-figd2104-2L-e" in tcl and "set clock_ns 5.0" in tcl
    assert "HLS estimate" in (out / "README.md").read_text()


def test_large_model_stays_bounded_and_streams_expert_weights(tmp_path):
    path = write(tmp_path, "big", """
model big {
  input(dim = 4096)
  block layer {
    attention(heads = 32, kv_heads = 8)
    moe { experts 8 x glu(4096, 14336); router top_k(k = 2) }
  }
  layers { repeat 2 { layer } }
  target hls { reuse = 4; max_unroll = 32; part = "xcvu13p-flga2577-2-e"; clock = 3.3 }
}""")
    project = project_for(compile_model(path))
    files = render(project, None)
    assert all(shape.lanes <= 32 for shape in project.linears)
    top = files["firmware/big.cpp"]
    assert top.count("#pragma HLS INTERFACE m_axi port=w_layers_") == 2 * 3  # every expert matrix off chip
    assert "UNROLL" not in top
    unrolled = re.findall(r"for \(([^)]*)\) \{\n#pragma HLS UNROLL", files["firmware/moec_kernels.h"])
    assert unrolled and all("< C::lanes" in loop or "< K" in loop for loop in unrolled)  # lanes, k <= max_unroll
    assert "set part xcvu13p-flga2577-2-e" in files["build_prj.tcl"] and "set clock_ns 3.3" in files["build_prj.tcl"]
    e = estimate(project)
    assert e["offchip_weight_bits"] == 2 * 3 * 8 * 4096 * 14336 * 18
    assert e["multipliers"] > 0 and e["cycles_per_token"] > 0


def test_ternary_experts_have_no_multipliers(tmp_path):
    project = project_for(compile_model(example("ternary_experts")))
    files = render(project, None)
    kernels = files["firmware/moec_kernels.h"]
    body = kernels.split("void linear_ternary", 1)[1].split("// One linear layer of either weight form", 1)[0]
    reduce_loop = body.split("Reduce:", 1)[1].split("Store:", 1)[0]
    assert "*" not in reduce_loop.replace("/*", "").replace("*/", "")
    assert "acc[l] += xi" in reduce_loop and "acc[l] -= xi" in reduce_loop
    steps = {r["kind"]: r for r in estimate(project)["steps"] if r["kind"] in ("experts", "ffn")}
    assert steps["experts"]["multipliers"] == 0 and steps["experts"]["scale_multipliers"] > 0
    assert steps["ffn"]["multipliers"] > 0  # the shared expert stays full precision


def test_precision_knobs_reach_the_types(tmp_path):
    path = write(tmp_path, "p", """
model p {
  input(dim = 8)
  block b { moe { experts 2 x mlp(8, 8); router top_k(k = 1) } }
  layers { b }
  target hls { precision = fixed(16, 6); weights = fixed(12, 2, round = truncate, overflow = wrap); reuse = 3 }
}""")
    project = project_for(compile_model(path))
    defines = render(project, None)["firmware/defines.h"]
    assert "typedef ap_fixed<12, 2, AP_TRN, AP_WRAP> weight_t;" in defines
    assert "typedef ap_fixed<16, 6, AP_RND, AP_SAT> act_t;" in defines
    assert "typedef ap_fixed<16, 6, AP_RND, AP_SAT> accum_t;" in defines
    assert {shape.reuse for shape in project.linears} == {3}
    assert all(shape.multipliers == -(-shape.lanes // 3) for shape in project.linears)


def test_generated_top_function_is_stable():
    """The emitted top function of examples/hls/task_experts.moe is kept in tests/golden; rewrite it
    after an intended change with MOEC_UPDATE_GOLDEN=1."""
    files = render(project_for(compile_model(example("task_experts"))), None)
    got = files["firmware/task_experts.cpp"] + files["firmware/parameters.h"]
    golden = os.path.join(os.path.dirname(__file__), "golden", "task_experts.hls.cpp")
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        with open(golden, "w") as fh:
            fh.write(got)
    with open(golden) as fh:
        assert got == fh.read(), "generated HLS code changed; if intended, rerun with MOEC_UPDATE_GOLDEN=1"


def test_identifiers_are_sanitised(tmp_path):
    assert c_identifier("int") == "m_int"
    assert c_identifier("3d") == "m_3d"
    assert c_identifier("a.b-c") == "a_b_c"
    assert c_identifier("__x") == "m_x"
    assert c_identifier("main") == "m_main"
    assert top_identifier("MOEC_DIM") == "m_MOEC_DIM" and top_identifier("w_x") == "m_w_x"
    assert top_identifier("Parameters") == "m_Parameters" and top_identifier("mixtral") == "mixtral"
    path = write(tmp_path, "kw", """
model class {
  modality new, delete
  input(dim = 8, modalities = [new, delete])
  block b { moe { group new { experts 2 x mlp(8, 8); router top_k(k = 1) }
                  group delete { experts 2 x mlp(8, 8); router top_k(k = 1) } } }
  layers { b }
}""")
    project = project_for(compile_model(path))
    assert project.name == "m_class"
    ident = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
    assert all(ident.match(w.cname) for w in project.weights)


@pytest.mark.parametrize("text, code, at", [
    ("weights = fixed(16, 20)", "E0206", "fixed"),
    ("activations = fixed(16, 6, round = up)", "E0206", "round"),
    ("reuse = 0", "E0206", "0"),
    ("reus = 2", "E0204", "reus"),
    ("accumulators = 3", "E0205", "3"),
    ('part = "a; exit"', "E0205", '"'),
    ("max_tokens = 2.5", "E0205", "2.5"),
])
def test_bad_knobs_give_diagnostics(tmp_path, capsys, text, code, at):
    path = write(tmp_path, "knobs", "model m {\n  input(dim = 8)\n  block b { moe { experts 2 x mlp(8, 8); "
                                    "router top_k(k = 1) } }\n  layers { b }\n  target hls { " + text + " }\n}\n")
    assert main(["check", path]) == 1
    col = len("  target hls { ") + text.index(at) + 1
    assert f"knobs.moe:5:{col}: error[{code}]" in capsys.readouterr().err


def test_unsupported_router_is_a_user_error(tmp_path, capsys):
    assert main(["compile", example("moma_expert_choice"), "-t", "hls", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moec: error:") and "expert_choice" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_report_target_hls(capsys):
    assert main(["report", example("mixtral"), "--target", "hls"]) == 0
    out = capsys.readouterr().out
    assert "DSP48" in out and "BRAM18K" in out and "cycles per token" in out and "model:" in out


# ---- C simulation ------------------------------------------------------------------------

@needs_toolchain
@pytest.mark.parametrize("name", ["mixtral", "moma", "ternary_experts", "task_experts"])
def test_csim_matches_pytorch(name):
    result = csim(example(name), seed=1)
    layers = len(compile_model(example(name)).spec.layers)
    assert result.tolerance == tolerance(project_for(compile_model(example(name))).config, layers)
    assert result.bad_routes == 0
    assert result.max_abs <= result.tolerance, result.summary()
    assert 0 < result.max_abs  # real fixed-point arithmetic, not a float pass-through
    assert not result.warnings
    assert "warning" not in result.compiler_output  # g++ -Wall -Wextra (unknown pragmas aside)


def test_group_named_like_a_keyword_finds_its_weights(tmp_path):
    """The PyTorch target spells a group `class` as `class_`; the HLS weights follow that spelling."""
    source = Path(example("moma")).read_text().replace("text", "class")
    path = write(tmp_path, "keyword", source)
    assert main(["compile", path, "-t", "hls", "-o", str(tmp_path / "o")]) == 0
    assert any((tmp_path / "o" / "firmware" / "weights").iterdir())


@needs_toolchain
@pytest.mark.parametrize("name", ["mixtral", "task_experts"])
def test_csim_tied_router_scores_pick_the_same_experts(name):
    """An all-zero input ties every router score (softmax and sigmoid): the C++ and PyTorch both
    take the lowest expert ids, so the outputs agree to rounding."""
    dim = project_for(compile_model(example(name))).dim
    result = csim(example(name), x=torch.zeros(6, dim), seed=1)  # the builds of test_csim_matches_pytorch
    assert bool(result.near_tie.all())  # every token sits on a tie, so csim sets them all apart ...
    assert float((result.output - result.reference).abs().max()) <= result.tolerance, result.summary()  # ... yet all agree


@needs_toolchain
def test_csim_checks_near_tie_tokens_against_the_cpp_routing():
    """Over 64 x 16 tokens two tokens' top-2 flips under fixed-point rounding (their 2nd and 3rd
    router logits lie 1e-4 apart): against PyTorch's own routing their error is far beyond the
    rounding tolerance. csim reruns PyTorch with the C++'s experts at near ties, so every token,
    those two included, is checked and agrees to rounding."""
    x = torch.randn(64, 16, 64, generator=torch.Generator().manual_seed(42))
    result = csim(example("mixtral"), x=x, seed=1)  # the build of test_csim_matches_pytorch
    own = (result.output - result.own_reference).abs().amax(-1)
    assert int((own > result.tolerance).sum()) == 2 and bool(result.flipped[own > result.tolerance].all())
    assert int(result.flipped.sum()) == 2 and 0 < int(result.near_tie.sum()) < 0.1 * own.numel()
    err = (result.output - result.reference).abs().amax(-1)
    assert result.ok and result.max_abs == float(err.max()) <= result.tolerance, result.summary()
    assert "over all 1024 tokens" in result.summary() and "(2 of them differ" in result.summary()


@needs_toolchain
def test_csim_near_tie_at_the_first_token_cannot_hide_saturating_sums(tmp_path):
    """Token 0 sits on a routing tie (an all-zero token ties every router score) and causal attention
    carries it to every later token; with accumulators that saturate the C simulation is wrong, and
    csim says so (all tokens checked, EXCEEDED, exit 1) and warns about the accumulators."""
    source = Path(example("mixtral")).read_text().replace("const d = 64", "const d = 16").replace("3.5 * d", "2 * d")
    path = write(tmp_path, "narrow_acc", source.replace("layers { repeat n_layers { decoder } }",
                                                        "layers { repeat n_layers { decoder } }\n"
                                                        "  target hls { accumulators = fixed(20, 1); max_tokens = 8 }"))
    x = 2 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x[0] = 0
    result = csim(path, x=x)
    assert bool(result.near_tie[0, 0]) and not result.ok and result.max_abs > result.tolerance
    assert any("accumulators fixed(20, 1" in w and "hold at most 1" in w for w in result.warnings), result.warnings
    assert result.accum_peak > 1 and "over all 8 tokens" in result.summary() and "EXCEEDED" in result.summary()


@needs_toolchain
def test_csim_hash_routing_keys_on_the_position_in_the_sequence(tmp_path):
    """Hash routing in a modality group: the C++ and PyTorch both hash a token's position in its
    sequence (not its place among the group's tokens), with text and image interleaved."""
    path = write(tmp_path, "hashed", """
model hashed {
  modality text, image
  input(dim = 16, modalities = [text, image])
  block layer { moe { group text { experts 4 x glu(16, 24); router deterministic(by = hash) }
                      group image { experts 2 x glu(16, 24); router top_k(k = 1) } } }
  layers { layer }
  target hls { max_tokens = 12 }
}""")
    modality = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0], [0] * 12])
    result = csim(path, x=torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(4)), modality=modality)
    assert result.ok and result.bad_routes == 0, result.summary()
    assert 0 < result.max_abs


@needs_toolchain
def test_overflow_wraps_without_saturation_and_is_warned(tmp_path):
    x = 3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0))  # beyond fixed(12, 4)'s +-8
    errors = {}
    for mode in ("wrap", "saturate"):
        path = write(tmp_path, mode, f"""
model overflow_{mode} {{
  input(dim = 16)
  block layer {{ moe {{ experts 2 x mlp(16, 32, act = relu); router top_k(k = 1) }} }}
  layers {{ layer }}
  target hls {{ activations = fixed(12, 4, overflow = {mode}); max_tokens = 8 }}
}}""")
        r = csim(path, x=x)
        assert any("hold at most 7.996" in w for w in r.warnings), r.warnings
        flips = int((r.output * r.reference < 0).sum())
        errors[mode] = (r.max_abs, flips)
    assert errors["wrap"][0] > 2.0 and errors["wrap"][1] > 0  # wrapped values change sign
    assert errors["saturate"][1] == 0 and errors["saturate"][0] < errors["wrap"][0] / 4


@needs_toolchain
def test_csim_command_with_npy_inputs_and_cached_build(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    x, task = tmp_path / "x.npy", tmp_path / "task.npy"
    np.save(x, np.random.default_rng(0).standard_normal((2, 5, 32)).astype("float32"))
    np.save(task, np.array([[0, 1, 2, 0, 1], [2, 2, 2, 2, 2]]))
    args = ["csim", example("task_experts"), "--input", str(x), "--task", str(task)]
    assert main(args) == 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "over 2 x 5 tokens" in out and "cached build" in out and ": ok" in out
    np.save(task, np.array([[0, 1, 2, 0, 7], [2, 2, 2, 2, 2]]))  # task 7 has no expert
    assert main(args) == 1
    assert "moec: error: task ids must lie in [0, 3)" in capsys.readouterr().err
    np.save(x, np.full((5, 32), np.nan, dtype="float32"))
    assert main(["csim", example("task_experts"), "--input", str(x)]) == 1
    assert "moec: error: input has NaN or infinite values" in capsys.readouterr().err
    np.save(x, np.zeros((5, 31), dtype="float32"))
    assert main(["csim", example("task_experts"), "--input", str(x)]) == 1
    assert "input must be [T, 32] or [B, T, 32], got (5, 31)" in capsys.readouterr().err


def test_missing_headers_are_named(monkeypatch, tmp_path):
    from moec.backends.hls import simulate as C

    monkeypatch.setenv("MOEC_AP_TYPES", str(tmp_path))
    with pytest.raises(BackendError, match="ap_fixed.h"):
        C.ap_types_dir()
    monkeypatch.delenv("MOEC_AP_TYPES")
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match="pip install --no-deps hls4ml==1.3.0"):
        C.ap_types_dir()


@needs_toolchain
def test_csim_empty_modality_group_and_batches():
    # all text in the first sequence (the image group gets no tokens), all image in the second
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    modality = torch.tensor([[0] * 6, [1] * 6])
    result = csim(example("moma"), x=x, modality=modality, seed=1)  # the build of test_csim_matches_pytorch
    assert result.output.shape == (2, 6, 64)
    assert result.max_abs <= result.tolerance, result.summary()


@needs_toolchain
def test_csim_streamed_ternary_experts_with_bias_and_ternary_shared_expert(tmp_path):
    # expert matrices above m_axi_threshold come through m_axi ports and are copied on chip per expert
    path = write(tmp_path, "streamed", """
model streamed {
  input(dim = 16)
  block b {
    norm = layer(eps = 1e-5)
    moe {
      experts 4 x mlp(16, 32, act = relu, weights = ternary, bias = true)
      shared 1 x glu(16, 32, weights = ternary)
      router top_k(k = 2, scale = 2.5)
    }
  }
  layers { repeat 2 { b } }
  target hls { max_tokens = 8; m_axi_threshold = 100 }
}""")
    project = project_for(compile_model(path))
    assert {w.keys[0].rsplit(".", 1)[-1] for w in project.offchip_weights} == {"up_proj", "down_proj"}
    result = csim(path)
    assert result.max_abs <= result.tolerance, result.summary()


def test_attributes_the_target_would_ignore_are_errors():
    from moec import ops as O
    from moec.backends.hls.model import _Builder
    from moec.backends.hls.precision import HlsConfig

    class RotaryAttention(O.AttentionOp):  # an attention feature the HLS kernels do not implement
        rope_theta: float | None = None

    builder = _Builder(compile_model(example("mixtral")).graph, HlsConfig())
    plain = RotaryAttention(name="a", dim=8, heads=2, kv_heads=2, head_dim=4)
    builder.check_fields(plain)
    with pytest.raises(BackendError, match="rope_theta = 10000.0"):
        builder.check_fields(plain.model_copy(update={"rope_theta": 10000.0}))


def test_csim_refuses_fractional_ids_complex_and_float32_overflowing_inputs(tmp_path, capsys):
    """Inputs are checked before anything is built: fractional ids are not truncated, a complex input
    is not silently made real, a float64 beyond float32's range is named as such, and a file that is
    not a .npy file is called that."""
    np = pytest.importorskip("numpy")
    ids, x = tmp_path / "ids.npy", tmp_path / "x.npy"
    np.save(ids, np.array([0.7, 1.9] * 8, dtype=np.float32))
    for flag in ("--modality", "--task"):
        assert main(["csim", example("moma"), flag, str(ids)]) == 1
        assert f"{flag[2:]} ids must be integers, got float32" in capsys.readouterr().err
    np.save(x, np.zeros((16, 64), dtype=np.complex64))
    assert main(["csim", example("moma"), "--input", str(x)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moec: error:") and "complex" in err and "Warning" not in err
    np.save(x, np.full((16, 64), 1e40))
    assert main(["csim", example("moma"), "--input", str(x)]) == 1
    err = capsys.readouterr().err
    assert "beyond float32's range" in err and "NaN" not in err
    readme = os.path.join(EXAMPLES, "..", "README.md")
    assert main(["csim", example("moma"), "--input", readme]) == 1
    err = capsys.readouterr().err
    assert "not a .npy file" in err and "pickled" not in err
    with pytest.raises(BackendError, match="complex"):
        csim(example("moma"), x=torch.zeros(4, 64, dtype=torch.complex64))


def test_estimate_weights_group_routers_by_share_and_sizes_queues_by_route_t():
    """moma's text and image groups each take half the tokens: their routers, like their experts,
    count half (route_top_k skips the other group's tokens); queue entries are a 32-bit token index
    and a route_t gate (13 bits), not an activation."""
    project = project_for(compile_model(example("moma")))
    e = estimate(project)
    routers = [r for r in e["steps"] if r["kind"] == "route_top_k"]
    gate = next(s for s in project.steps if s.kind == "route_top_k")
    shape = next(sh for sh in project.linears if sh.cname == gate.args["gc"])
    full = -(-shape.n_out // shape.lanes) * shape.n_in * shape.reuse + gate.args["experts"]
    assert routers and all(r["cycles_per_token"] == full / 2 for r in routers)
    defines = render(project, None)["firmware/defines.h"]
    assert "typedef ap_ufixed<13, 1, AP_RND, AP_SAT> route_t;" in defines
    assert all(r["buffer_bits"] == gate.args["experts"] * project.config.max_tokens * (32 + 13) for r in routers)
    assert "only its group's router" in format_estimate(e)


@needs_toolchain
def test_model_names_like_generated_identifiers_or_macros_compile(tmp_path):
    """The model name is the top function and the file stem: whatever it is (a generated queue,
    macro, weight or kernel-configuration name, a C macro, a system header's stem, a parameter of the
    top function), the project compiles: g++ -fsyntax-only on one unit holding every source."""
    import subprocess

    from moec.backends import write_tree
    from moec.backends.hls.simulate import ap_types_dir, compiler

    source = Path(example("mixtral")).read_text().replace("const d = 64", "const d = 16").replace("3.5 * d", "2 * d")
    names = ["q0", "MOEC_DIM", "w_final_norm_weight", "stderr", "math"]
    tops, jobs = set(), []
    for nm in names:
        path = write(tmp_path, nm, source.replace("model mixtral {", f"model {nm} {{"))
        project = project_for(compile_model(path))
        files = render(project, {w.cname: torch.zeros(w.size) for w in project.weights})
        top = project.name
        tops.add(top.lower())
        files["all.cpp"] = "".join(f'#include "{rel}"\n' for rel in (f"firmware/{top}.cpp", "bridge.cpp", f"tb/{top}_tb.cpp"))
        out = tmp_path / top
        write_tree(str(out), files)
        jobs.append((nm, subprocess.Popen([compiler(), "-std=c++14", "-fsyntax-only", "-isystem", ap_types_dir(),
                                           "-iquote", "firmware", "all.cpp"], cwd=out, stderr=subprocess.PIPE,
                                          text=True)))
    for nm, job in jobs:
        err = job.communicate()[1]
        assert job.returncode == 0, f"model `{nm}`:\n{err[-2000:]}"
    assert len(tops) == len(names)
    assert {"q0", "m_moec_dim", "m_w_final_norm_weight", "m_stderr", "math"} <= tops
    generated = render(project_for(compile_model(write(tmp_path, "linear_16x16_l16_r1", source.replace(
        "model mixtral {", "model linear_16x16_l16_r1 {")))), None)["firmware/parameters.h"]
    assert "moec_linear_16x16_l16_r1;" in generated  # kernel configurations live in the moec_ space
