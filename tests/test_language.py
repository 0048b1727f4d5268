"""Language features, checked on the ModelSpec that `moec.driver.frontend` returns."""

from __future__ import annotations

import pytest
from moec.diagnostics import CompileError, Diagnostics
from moec.driver import frontend
from moec.dsl.elaborate import Elaborator, ModelSpec
from moec.dsl.loader import load_program


def spec_of(tmp_path, src: str, name: str = "m.moe") -> ModelSpec:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(src)
    return frontend(str(path))


def ops(spec: ModelSpec, layer: int = 0) -> list:
    return [s.op for s in spec.layers[layer].sublayers]


def hidden_sizes(spec: ModelSpec, layer: int = 0) -> list[int]:
    return [op.expert.hidden for op in ops(spec, layer) if op.kind == "ffn"]


# ---- constants and arithmetic ---------------------------------------------------------------------------
ARITH = {
    "7 / 2": 3.5, "8 / 2": 4, "7 // 2": 3, "7 % 3": 1, "-7 // 2": -4, "-7 % 3": 2, "7.5 // 2": 3.0,
    "2 + 3 * 4": 14, "(2 + 3) * 4": 20, "-3 + 5": 2, "--3": 3, "+3": 3, "2 - -1": 3, "-(2 + 3)": -5,
    "10 - 3 - 2": 5, "100 / 10 / 5": 2, "2 * 3 % 4": 2, "((((1))))": 1, "2 * (3 + (4 - 1)) // 5": 2,
    "1e-6": 1e-6, "1.5e3": 1500.0, "1e3": 1000.0, "2.5E+2": 250.0, "3.5 * 64": 224.0, "0.1 + 0.2": 0.1 + 0.2,
    "1 - 1": 0, "123456789 * 1000": 123456789000,
}


def constants_of(tmp_path, src: str) -> dict:
    """The values of a file's top-level constants, as the checker computes them."""
    path = tmp_path / "consts.moe"
    path.write_text(src)
    diags = Diagnostics()
    program = load_program(str(path), diags)
    checker = Elaborator(diags)
    for item in program.root.definitions:
        checker.declare(checker.global_scope, item)
    assert not diags.has_errors, diags.items
    return checker.global_scope.consts


def test_constant_arithmetic(tmp_path):
    names = [f"c{i}" for i in range(len(ARITH))]
    got = constants_of(tmp_path, "\n".join(f"const {n} = {expr}" for n, expr in zip(names, ARITH)))
    for n, (expr, want) in zip(names, ARITH.items()):
        assert got[n] == want and type(got[n]) is type(want), (expr, got[n], want)


def test_constants_refer_to_earlier_constants_and_feed_sizes(tmp_path):
    spec = spec_of(tmp_path, """
const base = 16
model m {
  const d = base * 2, f = 4 * d, half = f / 2, quarter = f // 4, eps = 1e-5 * 10
  input(dim = d)
  block b { norm = rms(eps = eps); attention(heads = d / 8); glu(d, half); mlp(d, quarter - 8, act = relu) }
  layers { b }
}
""")
    assert spec.dim == 32
    att, g, m = ops(spec)
    assert (att.heads, att.head_dim, att.kv_heads) == (4, 8, 4)
    assert (g.expert.form, g.expert.hidden, g.expert.act) == ("glu", 64, "silu")
    assert (m.expert.form, m.expert.hidden, m.expert.act) == ("mlp", 24, "relu")
    assert spec.layers[0].sublayers[0].norm.eps == pytest.approx(1e-4)


def test_float_that_is_a_whole_number_is_accepted_as_a_size(tmp_path):
    spec = spec_of(tmp_path, """model m {
  const d = 64, f = 3.5 * d
  input(dim = d)
  block b { glu(d, f) }
  layers { b }
}""")
    assert hidden_sizes(spec) == [224] and isinstance(hidden_sizes(spec)[0], int)


def test_multiple_constants_per_statement_and_string_bool_values(tmp_path):
    spec = spec_of(tmp_path, """model m {
  const a = 1, b = a + 1, c = b * 3
  const yes = true, no = false, s = "text"
  input(dim = 8)
  block blk { attention(heads = 2, bias = yes, causal = no); glu(8, c) }
  layers { blk }
}""")
    att, g = ops(spec)
    assert (att.bias, att.causal) == (True, False)
    assert g.expert.hidden == 6


# ---- parametric experts and blocks ---------------------------------------------------------------------
def test_parametric_experts(tmp_path):
    spec = spec_of(tmp_path, """model m {
  const d = 16
  input(dim = d)
  expert e(w) = glu(d, w)
  expert act_e(w, a) = mlp(d, w, act = a)
  expert wide(m) = e(m * 2)
  expert fixed = e(8)
  block b { e(32); e(w = 48); act_e(20, "gelu_tanh"); wide(10); fixed }
  layers { b }
}""")
    assert hidden_sizes(spec) == [32, 48, 20, 20, 8]
    assert ops(spec)[2].expert.act == "gelu_tanh" and ops(spec)[2].expert.form == "mlp"


def test_symbols_pass_through_parametric_definitions(tmp_path):
    spec = spec_of(tmp_path, """model m {
  input(dim = 8)
  expert act_e(w, a) = mlp(8, w, act = a)
  block b(r) { residual = r; act_e(20, gelu_tanh) }
  layers { b(post_norm) }
}""")
    assert ops(spec)[0].expert.act == "gelu_tanh"
    assert spec.layers[0].residual == "post_norm"


def test_parametric_experts_in_moe(tmp_path):
    spec = spec_of(tmp_path, """model m {
  const d = 16
  input(dim = d)
  expert e(w) = glu(d, w, act = gelu)
  block b { moe { experts 8 x e(24); shared 2 x e(12); router top_k(k = 2) } }
  layers { b }
}""")
    moe = ops(spec)[0]
    assert moe.kind == "moe"
    (group,) = moe.groups
    assert (group.num_experts, group.expert.hidden, group.expert.act, group.router.k) == (8, 24, "gelu", 2)
    assert (moe.num_shared, moe.shared.hidden) == (2, 12)


def test_parametric_blocks(tmp_path):
    spec = spec_of(tmp_path, """model m {
  const d = 16
  input(dim = d)
  block b(n, w) { attention(heads = n); glu(d, w) }
  layers { b(4, 32) b(2, 32) b(n = 4, w = 32) b(4, w = 64) }
}""")
    heads = [ops(spec, i)[0].heads for i in range(4)]
    widths = [hidden_sizes(spec, i)[0] for i in range(4)]
    assert heads == [4, 2, 4, 4] and widths == [32, 32, 32, 64]
    assert spec.layers[0] is spec.layers[2]  # same arguments: one block instance
    keys = [layer.key for layer in spec.layers]
    assert len(set(keys)) == 3 and keys[0] == keys[2]
    assert all(layer.name == "b" for layer in spec.layers)


def test_block_keys_are_unique_per_block_and_arguments(tmp_path):
    spec = spec_of(tmp_path, """model m {
  input(dim = 8)
  block c(n) { glu(8, 4 * n) }
  block c_4 { glu(8, 8) }
  layers { c(4) c_4 }
}""")
    assert hidden_sizes(spec, 0) != hidden_sizes(spec, 1)
    assert spec.layers[0].key != spec.layers[1].key


# ---- layer stacks -------------------------------------------------------------------------------------
LAYER_MODEL = """model m {{
  input(dim = 8)
  block dense {{ attention(heads = 2); glu(8, 16) }}
  block sparse {{ attention(heads = 2); moe {{ experts 4 x glu(8, 16); router top_k(k = 1) }} }}
  block a {{ glu(8, 8) }}
  block b {{ glu(8, 4) }}
  const n = 3
  layers {{ {layers} }}
}}"""


@pytest.mark.parametrize("layers,names", [
    ("dense", ["dense"]),
    ("dense sparse dense", ["dense", "sparse", "dense"]),
    ("dense repeat 3 { sparse dense }", ["dense"] + ["sparse", "dense"] * 3),
    ("dense repeat n - 1 { sparse }", ["dense", "sparse", "sparse"]),
    ("repeat 2 { a repeat 3 { b } }", ["a", "b", "b", "b", "a", "b", "b", "b"]),
    ("repeat 2 { repeat 2 { repeat 2 { a } b } }", (["a", "a", "b"] * 2) * 2),
    ("repeat 1 { dense }; sparse; repeat 2 { a; b }", ["dense", "sparse", "a", "b", "a", "b"]),
])
def test_layer_patterns(tmp_path, layers, names):
    spec = spec_of(tmp_path, LAYER_MODEL.format(layers=layers))
    assert [layer.name for layer in spec.layers] == names
    for layer in spec.layers:
        kinds = [op.kind for op in (s.op for s in layer.sublayers)]
        assert ("moe" in kinds) == (layer.name == "sparse")


def test_first_layer_dense_then_alternating(tmp_path):
    spec = spec_of(tmp_path, LAYER_MODEL.format(layers="dense repeat 4 { sparse dense }"))
    kinds = ["moe" if any(s.op.kind == "moe" for s in layer.sublayers) else "dense" for layer in spec.layers]
    assert kinds == ["dense"] + ["moe", "dense"] * 4


def test_many_layers(tmp_path):
    spec = spec_of(tmp_path, LAYER_MODEL.format(layers="repeat 100 { repeat 100 { a } }"))
    assert len(spec.layers) == 10_000


# ---- imports ----------------------------------------------------------------------------------------
def test_imports_relative_paths_and_definitions(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sizes.moe").write_text("const d = 32, f = 4 * d\n")
    (tmp_path / "lib" / "experts.moe").write_text('import "sizes.moe"\nexpert swiglu(w) = glu(d, w)\n')
    (tmp_path / "shared.moe").write_text("const heads = 4\n")
    (tmp_path / "lib" / "blocks.moe").write_text(
        'import "experts.moe"\nimport "../shared.moe"\n'
        "block decoder(w) { attention(heads = heads); swiglu(w) }\n")
    spec = spec_of(tmp_path, """import "lib/blocks.moe"
import "lib/sizes.moe"  # imported twice (diamond): definitions are not duplicated
model m {
  input(dim = d)
  layers { decoder(f) repeat 2 { decoder(f / 2) } }
}
""", "main.moe")
    assert spec.dim == 32
    assert [hidden_sizes(spec, i)[0] for i in range(3)] == [128, 64, 64]
    assert ops(spec)[0].heads == 4


def test_import_from_subdirectory_model(tmp_path):
    (tmp_path / "common.moe").write_text("const d = 8\nblock b { glu(d, 16) }\n")
    spec = spec_of(tmp_path, 'import "../common.moe"\nmodel m { input(dim = d); layers { b } }\n', "sub/m.moe")
    assert spec.dim == 8 and hidden_sizes(spec) == [16]


def test_imported_model_is_ignored_and_root_model_used(tmp_path):
    (tmp_path / "other.moe").write_text("const d = 8\nmodel other { input(dim = 999); layers { } }\n")
    spec = spec_of(tmp_path, 'import "other.moe"\nmodel root { input(dim = d); block b { glu(d, 8) }; layers { b } }\n')
    assert spec.name == "root" and spec.dim == 8


# ---- separators and comments ----------------------------------------------------------------------------
def _same_model(a: ModelSpec, b: ModelSpec) -> bool:
    def shape(s: ModelSpec):
        return (s.name, s.dim, s.modalities, [(layer.name, layer.residual,
                                               [(x.op.model_dump(exclude={"loc"}),
                                                 x.norm.model_dump(exclude={"loc"})) for x in layer.sublayers])
                                              for layer in s.layers])
    return shape(a) == shape(b)


def test_separators_newlines_semicolons_and_none(tmp_path):
    multi = spec_of(tmp_path, """model m {
  const d = 8
  input(dim = d)
  block b {
    attention(heads = 2)
    glu(d, 16)
  }
  layers {
    b
    b
  }
}
""", "a.moe")
    semis = spec_of(tmp_path, "model m { const d = 8; input(dim = d); block b { attention(heads = 2); glu(d, 16) };"
                              " layers { b; b } }", "b.moe")
    none = spec_of(tmp_path, "model m { const d = 8 input(dim = d) block b { attention(heads = 2) glu(d, 16) }"
                             " layers { b b } }", "c.moe")
    extra = spec_of(tmp_path, "model m {;; const d = 8;;; input(dim = d);\n;\n block b {; attention(heads = 2);;"
                              " glu(d, 16); }; layers {; b;; b; };};;", "d.moe")
    assert _same_model(multi, semis) and _same_model(multi, none) and _same_model(multi, extra)
    assert len(multi.layers) == 2


def test_comments(tmp_path):
    spec = spec_of(tmp_path, """# a model # with hashes
model m {  # trailing comment
  const d = 8  # width
  # const d = 9
  input(dim = d)#no space
  block b { glu(d, 16) # } not closed by this brace
  }
  layers { b }
}
# the end""")
    assert spec.dim == 8 and hidden_sizes(spec) == [16]


def test_tabs_crlf_and_blank_lines(tmp_path):
    spec = spec_of(tmp_path, "model m {\r\n\r\n\tinput(dim = 8)\r\n\tblock b {\tglu(8, 16)\t}\r\n\r\n\tlayers { b }\r\n}\r\n")
    assert hidden_sizes(spec) == [16]


# ---- defaults and block settings --------------------------------------------------------------------------
def test_defaults(tmp_path):
    spec = spec_of(tmp_path, """model m {
  input(dim = 16)
  block b { attention(heads = 4); glu(16, 32); mlp(16, 8); moe { experts 4 x glu(16, 8); router top_k(k = 2) } }
  layers { b }
}""")
    assert spec.modalities == ("default",) and spec.input_modalities == ("default",)
    layer = spec.layers[0]
    assert layer.residual == "pre_norm"
    for sub in layer.sublayers:
        assert (sub.norm.norm, sub.norm.eps, sub.norm.dim) == ("rms", 1e-6, 16)
    att, g, m, moe = ops(spec)
    assert (att.kv_heads, att.head_dim, att.bias, att.causal) == (4, 4, False, True)
    assert (g.expert.act, g.expert.bias, m.expert.act) == ("silu", False, "gelu")
    (group,) = moe.groups
    assert (group.router.score, group.router.renormalize, group.router.scale) == ("softmax", False, 1.0)
    assert (moe.losses.load_balance, moe.losses.z_loss, moe.num_shared, moe.shared) == (0.0, 0.0, 0, None)
    assert spec.final_norm is not None
    assert (spec.final_norm.norm, spec.final_norm.eps, spec.final_norm.dim) == ("rms", 1e-6, 16)
    assert [s.norm.name for s in layer.sublayers] == ["attention_norm", "ffn_norm", "ffn_1_norm", "moe_norm"]
    assert [s.op.name for s in layer.sublayers] == ["attention", "ffn", "ffn_1", "moe"]


def test_norm_layer_and_post_norm(tmp_path):
    spec = spec_of(tmp_path, """model m {
  input(dim = 8)
  block pre { norm = layer(eps = 1e-5); glu(8, 16) }
  block post { residual = post_norm; norm = rms; glu(8, 16) }
  block pre2 { norm = layer; glu(8, 16) }
  layers { pre post pre2 }
}""")
    pre, post, pre2 = spec.layers
    assert (pre.residual, pre.sublayers[0].norm.norm, pre.sublayers[0].norm.eps) == ("pre_norm", "layer", 1e-5)
    assert (post.residual, post.sublayers[0].norm.norm, post.sublayers[0].norm.eps) == ("post_norm", "rms", 1e-6)
    assert (pre2.sublayers[0].norm.norm, pre2.sublayers[0].norm.eps) == ("layer", 1e-5)
    assert (spec.final_norm.norm, spec.final_norm.eps) == ("layer", 1e-5)  # follows the last block


def test_post_norm_stack_has_no_final_norm(tmp_path):
    spec = spec_of(tmp_path, """model m {
  input(dim = 8)
  block b { residual = post_norm; norm = layer(eps = 1e-5); attention(heads = 2); glu(8, 16) }
  layers { repeat 2 { b } }
}""")
    assert spec.final_norm is None
    assert all(layer.residual == "post_norm" for layer in spec.layers)
    assert spec.layers[0].sublayers[1].norm.norm == "layer"


# ---- modalities, groups, routers, losses, targets ----------------------------------------------------------
def test_modalities_groups_and_default_router(tmp_path):
    spec = spec_of(tmp_path, """model m {
  modality text, image, audio
  input(dim = 8, modalities = [text, audio])
  block b {
    moe {
      router top_k(k = 2, score = sigmoid, renormalize = true, scale = 2.5)
      group text { experts 4 x glu(8, 16) }
      group audio { experts 2 x mlp(8, 16); router top_k(k = 1); shared 1 x glu(8, 4) }
      shared 2 x glu(8, 8)
      loss load_balance(0.01), z_loss(coef = 0.001)
    }
  }
  layers { b }
}""")
    assert spec.modalities == ("text", "image", "audio")
    assert spec.input_modalities == ("text", "audio")
    moe = ops(spec)[0]
    text, audio = moe.groups
    assert (text.name, text.modalities, text.num_experts) == ("text", (0,), 4)
    assert (text.router.k, text.router.score, text.router.renormalize, text.router.scale) == (2, "sigmoid", True, 2.5)
    assert (audio.name, audio.modalities, audio.router.k, audio.router.score) == ("audio", (2,), 1, "softmax")
    assert (audio.num_shared, audio.shared.hidden) == (1, 4)
    assert (moe.num_shared, moe.shared.hidden) == (2, 8)
    assert (moe.losses.load_balance, moe.losses.z_loss) == (0.01, 0.001)


def test_group_of_several_modalities(tmp_path):
    spec = spec_of(tmp_path, """model m {
  modality text, image, audio
  input(dim = 8, modalities = [text, image, audio])
  block b { moe { group text, audio { experts 4 x glu(8, 16); router top_k(k = 1) }
                  group image { experts 2 x glu(8, 16); router top_k(k = 1) } } }
  layers { b }
}""")
    ta, im = ops(spec)[0].groups
    assert (ta.name, ta.modalities) == ("text_audio", (0, 2))
    assert (im.name, im.modalities) == ("image", (1,))


def test_ungrouped_moe_routes_all_carried_modalities(tmp_path):
    spec = spec_of(tmp_path, """model m {
  modality text, image
  input(dim = 8, modalities = [image])
  block b { moe { experts 4 x glu(8, 16); router top_k(4) } }
  layers { b }
}""")
    (group,) = ops(spec)[0].groups
    assert (group.name, group.modalities, group.router.k) == ("all", (1,), 4)


def test_targets_and_placement(tmp_path):
    spec = spec_of(tmp_path, """model m {
  const ep = 8
  input(dim = 8)
  block b { glu(8, 16) }
  layers { b }
  target pytorch { }
  target triton { block_m = ep * 4; block_t = 16.0 }
  placement { devices = ep / 2; memory = "80GB" }
}""")
    assert spec.targets == {"pytorch": {}, "triton": {"block_m": 32, "block_t": 16}}
    assert spec.placement == {"devices": 4, "memory": "80GB"}


@pytest.mark.parametrize(("setting", "code", "message"), [
    ("target triton { block_m = 24 }", "E0206", "`block_m` must be a power of two >= 16, got 24"),
    ("target triton { block_n = 8 }", "E0206", "`block_n` must be a power of two >= 16, got 8"),
    ("target triton { block_k = true }", "E0206", "`block_k` must be a power of two >= 16, got true"),
    ("target triton { tile = 64 }", "E0204", "unknown triton setting `tile`"),
    ("target triton { block_m = 16; block_m = 32 }", "E0203", "triton setting `block_m` is already given"),
    ("target pytorch { dtype = bf16 }", "E0204", "unknown pytorch setting `dtype`"),
    ("target mlir { dialect = tosa }", "E0204", "unknown mlir setting `dialect`"),
])
def test_target_settings_are_checked(tmp_path, setting, code, message):
    with pytest.raises(CompileError) as err:
        spec_of(tmp_path, f"model m {{ input(dim = 8); block b {{ glu(8, 16) }}; layers {{ b }}; {setting} }}")
    (diag,) = err.value.diagnostics.items
    assert (diag.code, diag.message) == (code, message) and diag.hint


def test_keywords_of_other_languages_are_plain_names(tmp_path):
    spec = spec_of(tmp_path, """model model {
  modality int, float
  input(dim = 8, modalities = [int, float])
  const def = 2, class_ = def * 2, const = 3
  expert lambda = glu(8, 16)
  block class { attention(heads = def); moe { group int { experts 2 x lambda; router top_k(k = 1) }
                                             group float { experts const x lambda; router top_k(k = 1) } } }
  layers { class }
}""")
    assert spec.name == "model" and spec.modalities == ("int", "float")
    assert [g.num_experts for g in ops(spec)[1].groups] == [2, 3]
    assert spec.layers[0].name == "class"


def test_frontend_raises_compile_error_with_all_diagnostics(tmp_path):
    with pytest.raises(CompileError) as info:
        spec_of(tmp_path, """model m {
  input(dim = 8)
  block b { attention(heads = 3); glu(8, 0) }
  layers { b }
}""")
    assert sorted(d.code for d in info.value.diagnostics.items) == ["E0207", "E0210"]


def test_a_byte_order_mark_is_not_part_of_the_source(tmp_path):
    path = tmp_path / "bom.moe"
    path.write_bytes(b"\xef\xbb\xbf" + b"model m {\n  input(dim = 8)\n  block b { glu(8, 16) }\n  layers { b }\n}\n")
    assert frontend(str(path)).name == "m"
