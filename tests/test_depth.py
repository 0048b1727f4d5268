"""Mixture-of-Depths (`depth = keep_top(...)`): generated modules against the plain reference
(forward and backward), token choice with ties and empty candidate sets, attention among the kept
tokens, per-layer ratio schedules, accounting invariants and misuse diagnostics."""

from __future__ import annotations

import math
import os

import moec
import pytest
import torch
from moec.backends.pytorch.depth import DepthRouter
from moec.backends.pytorch.runtime import Attention
from moec.cli import main
from moec.driver import check, compile_model, frontend
from test_pytorch_backend import EXAMPLES, _check, _write

DEPTH = """
model mod {{
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {{
    depth = {depth}
    {settings}
    {attention}
    {ffn}
  }}
  block dense {{ attention(heads = 2); glu(d, 24) }}
  layers {{ b; dense; b }}
}}
"""


def _model(tmp_path, depth="keep_top(0.5)", settings="", attention="attention(heads = 2)", ffn="glu(d, 24)",
           name="m.moe"):
    return _write(tmp_path, DEPTH.format(depth=depth, settings=settings, attention=attention, ffn=ffn), name)


GROUPED_MOE = ("moe { group text { experts 3 x glu(d, 8); router top_k(k = 2) }\n"
               "      group image { experts 3 x glu(d, 8); router top_k(k = 1) }\n"
               "      loss load_balance(0.1), z_loss(0.01) }")
SHARED_MOE = ("moe { experts 4 x glu(d, 8); shared 1 x glu(d, 8); router top_k(k = 2)\n"
              "      loss load_balance(0.1), z_loss(0.01) }")


@pytest.mark.parametrize("depth,settings,attention,ffn", [
    ("keep_top(0.4, modalities = [image], weight = tanh)", "", "attention(heads = 4, kv_heads = 2)", "mlp(d, 20)"),
    ("keep_top(0.6, modalities = [text])", "residual = post_norm", "attention(heads = 2, causal = false)",
     "glu(d, 24)"),
    ("keep_top(0.5, modalities = [image])", "per_modality = true", "attention(heads = 2, bias = true)", "glu(d, 24)"),
    ("keep_top(0.5)", "per_modality = true", "attention(heads = 2, rope_theta = 100.0)", "glu(d, 24)"),
    ("keep_top(0.5, modalities = [image])", "", 'attention(heads = 2, rope_theta = 100.0, qk_norm = "head")',
     GROUPED_MOE),
    ("keep_top(0.3, modalities = [text])", "", "attention(heads = 4, shared_heads = 1, routed_heads = 2)",
     SHARED_MOE),
])
def test_static_depth_blocks_match_reference(tmp_path, depth, settings, attention, ffn):
    """The static form: every token goes through the block, the kept ones' results are used, and
    the MoE layers count, route and balance only the kept tokens. A text-only sequence, an
    image-only one and a mixed one."""
    path = _model(tmp_path, depth, settings, attention, ffn)
    torch.manual_seed(26)
    modality = torch.stack([torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long),
                            torch.randint(0, 2, (10,))])
    _check(path, torch.randn(3, 10, 16), modality, static=True)


@pytest.mark.parametrize("depth,settings,attention,ffn", [
    ("keep_top(0.5)", "", "attention(heads = 2)", "glu(d, 24)"),
    ("keep_top(0.5, modalities = [image])", "",
     'attention(heads = 4, kv_heads = 2, rope_theta = 100.0, qk_norm = "projection")', "glu(d, 24)"),
    ("keep_top(0.4, modalities = [image], weight = tanh)", "", "attention(heads = 4, kv_heads = 2)", "mlp(d, 20)"),
    ("keep_top(0.6, modalities = [text])", "residual = post_norm", "attention(heads = 2, causal = false)",
     "glu(d, 24)"),
    ("keep_top(0.5, modalities = [image])", "per_modality = true", "attention(heads = 2, bias = true)", "glu(d, 24)"),
    ("keep_top(0.7)", "", "attention(heads = 4, shared_heads = 1, routed_heads = 2)", "glu(d, 24)"),
    ("keep_top(0.5, modalities = [image])", "", "attention(heads = 2)",  # MoMa with Mixture-of-Depths
     ("moe { group text { experts 3 x glu(d, 8); router top_k(k = 1) }\n"
      "      group image { experts 3 x glu(d, 8); router expert_choice(capacity = 1.0) }\n"
      "      loss load_balance(0.1), z_loss(0.01) }")),
])
def test_depth_blocks_match_reference(tmp_path, depth, settings, attention, ffn):
    path = _model(tmp_path, depth, settings, attention, ffn)
    torch.manual_seed(21)
    _check(path, torch.randn(3, 10, 16), torch.randint(0, 2, (3, 10)))


@pytest.mark.parametrize("shape", [(10, 16), (2, 2, 7, 16)])
def test_depth_blocks_take_any_leading_shape(tmp_path, shape):
    path = _model(tmp_path, "keep_top(0.3, modalities = [image])")
    torch.manual_seed(22)
    _check(path, torch.randn(*shape), torch.randint(0, 2, shape[:-1]))


def test_sequences_without_candidates_and_tiny_ratios(tmp_path):
    """A text-only sequence keeps everything; an image-only one keeps ceil(ratio * n) >= 1 token."""
    path = _model(tmp_path, "keep_top(0.05, modalities = [image])")
    modality = torch.tensor([[0] * 9, [1] * 9, [0, 1] * 4 + [1]])
    torch.manual_seed(23)
    _check(path, torch.randn(3, 9, 16), modality)


def test_ties_keep_the_earliest_tokens(tmp_path):
    """With a zero router every score ties: each sequence keeps its first ceil(ratio * n) candidates."""
    path = _model(tmp_path, "keep_top(0.5, modalities = [image])")

    def zero_router(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("depth.router.weight"):
                    p.zero_()

    torch.manual_seed(24)
    modality = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]])
    model, _ = _check(path, torch.randn(2, 8, 16), modality, perturb=zero_router)
    route = model.layers[0].depth(torch.randn(2, 8, 16, dtype=torch.float64), modality)
    assert route.rows.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 13, 14, 15]  # images: 6 -> 3, 3 -> 2 (ceil)
    assert route.max_kept == 7


def test_depth_router_keeps_the_highest_scores():
    router = DepthRouter(dim=4, ratio=0.5)
    with torch.no_grad():
        router.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
    x = torch.zeros(1, 6, 4)
    x[0, :, 0] = torch.tensor([0.1, 3.0, -1.0, 2.0, 5.0, 0.0])
    route = router(x, torch.zeros(1, 6, dtype=torch.long))
    assert route.rows.tolist() == [1, 3, 4] and route.slots.tolist() == [0, 1, 2]
    torch.testing.assert_close(route.weight, torch.sigmoid(torch.tensor([3.0, 2.0, 5.0])))


def test_every_token_route_is_static_and_exports_with_ties():
    """Without `modalities` each sequence keeps ceil(ratio * S) tokens: no padding, no host sync.
    Under torch.export the positions come from comparisons, equal to the stable sort's, ties (the
    earlier token first) included."""

    class Route(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.depth = DepthRouter(dim=4, ratio=0.5)

        def forward(self, x):
            r = self.depth(x, torch.zeros(x.shape[:-1], dtype=torch.long))
            return r.rows, r.slots, r.positions, r.weight

    module = Route()
    with torch.no_grad():
        module.depth.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
    x = torch.zeros(3, 7, 4)
    x[0, :, 0] = torch.tensor([0.1, 3.0, -1.0, 2.0, 5.0, 1.0, 1.0])  # the 4th place ties: the earlier wins
    x[2, :, 0] = torch.randn(7)  # sequence 1: all scores tie
    exported = torch.export.export(module, (x,))
    assert not any(op in str(n.target) for n in exported.graph.nodes for op in ("sort", "nonzero", "item"))
    eager = module(x)
    for a, b in zip(eager, exported.module()(x)):
        assert torch.equal(a, b)
    rows = eager[0].tolist()  # ceil(0.5 * 7) = 4 per sequence
    assert rows[:8] == [1, 3, 4, 5, 7, 8, 9, 10] and eager[1].tolist() == [0, 1, 2, 3] * 3
    route = module.depth(x, None)
    assert route.full and route.attention_mask(causal=True) is None and route.max_kept == 4


@pytest.mark.parametrize("causal", [True, False])
def test_attention_among_kept_tokens_equals_masked_full_attention(causal):
    """The padded attention of the kept rows (rotary at their original positions) equals attention
    over the whole sequence with the skipped tokens masked out as keys."""
    torch.manual_seed(25)
    attn = Attention(dim=16, heads=4, kv_heads=2, head_dim=4, causal=causal, rope_theta=100.0, qk_norm="head").double()
    router = DepthRouter(dim=16, ratio=0.5, modalities=(1,)).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    modality = torch.randint(0, 2, (3, 9))
    route = router(x, modality)
    kept = attn(route.select_rows(x), route=route)
    keep = torch.zeros(27, dtype=torch.bool)
    keep[route.rows] = True
    keep = keep.view(3, 9)
    allowed = keep[:, None, :] | ~keep[:, :, None]
    if causal:
        allowed = allowed & torch.ones(9, 9, dtype=torch.bool).tril()
    full = attn._attend(x, None, torch.arange(9).expand(3, 9), allowed[:, None], 9)
    torch.testing.assert_close(kept, full.reshape(27, 16)[route.rows])


def test_per_layer_ratio_schedules(tmp_path):
    path = _write(tmp_path, DEPTH.format(depth="keep_top(layer_cosine(0.9, 0.2, shift = 0.25))", settings="",
                                         attention="attention(heads = 2)", ffn="glu(d, 24)")
                  .replace("layers { b; dense; b }", "layers { repeat 5 { b } }"))
    spec = frontend(path)
    ratios = [b.depth.ratio_at(i, 5) for i, b in enumerate(spec.layers)]
    expected = [0.9, 0.9] + [0.2 + 0.7 * (1 + math.cos(math.pi * (i / 4 - 0.25) / 0.75)) / 2 for i in (2, 3, 4)]
    assert ratios == pytest.approx(expected) and ratios[-1] == pytest.approx(0.2)
    model = moec.load(path)
    assert [layer.depth.ratio for layer in model.layers] == pytest.approx(ratios)
    linear = _write(tmp_path, DEPTH.format(depth="keep_top(layer_linear(1.0, 0.5))", settings="",
                                           attention="attention(heads = 2)", ffn="glu(d, 24)"), "lin.moe")
    assert [b.depth.ratio_at(i, 3) for i, b in enumerate(frontend(linear).layers) if b.depth] == [1.0, 0.5]
    torch.manual_seed(26)
    _check(path, torch.randn(2, 7, 16), torch.randint(0, 2, (2, 7)))


def test_depth_accounting_gives_the_mixture_of_depths_flop_fraction():
    """Video tokens cost ratio x the dense block (plus the depth router's 2d); over a mix of
    T_text and T_video tokens the block FLOPs are (T_text + r T_video) / T of the dense model's."""
    a = compile_model(os.path.join(EXAMPLES, "video_depth.moe")).results["analysis"]
    d, f = 64, 128
    dense = 2 * 4 * d * d + 2 * 3 * d * f  # attention projections + the GLU
    router = 2 * d
    for layer in a["layers"]:
        assert layer["flops_per_token"]["text"] == dense + router
        assert layer["flops_per_token"]["video"] == pytest.approx(0.2 * dense + router)
        assert layer["depth"] == {"ratio": 0.2, "modalities": ["video"], "causal": False}
        assert layer["params"] == dense // 2 + 2 * d + d  # weights, the two norms, the router
    t_text, t_video = 200, 800
    total = t_text * a["flops_per_token"]["text"] + t_video * a["flops_per_token"]["video"]
    routers = (t_text + t_video) * router * 4
    assert (total - routers) / ((t_text + t_video) * dense * 4) == pytest.approx((t_text + 0.2 * t_video) / 1000)


def test_report_prints_the_ratios(capsys):
    assert main(["report", os.path.join(EXAMPLES, "progressive_depth.moe")]) == 0
    out = capsys.readouterr().out
    assert "Mixture-of-Depths" in out and "NON-CAUSAL" in out
    assert "\n      5  keeps 0.300 of image tokens" in out and "\n    0-1  keeps 1.000 of image tokens" in out


def test_generated_code_reads_like_mixture_of_depths(tmp_path):
    out = tmp_path / "out"
    assert main(["compile", os.path.join(EXAMPLES, "video_depth.moe"), "--target", "pytorch", "-o", str(out)]) == 0
    source = (out / "video_depth.py").read_text()
    assert "route = self.depth(x, modality)" in source and "h = self.attention(h, route=route)" in source
    assert "x = depth_combine(x, x_kept, route)" in source and "DecoderBlock(ratio=0.2)," in source
    assert "DecoderBlock: 2 (2 x Mixture-of-Depths token selection)" in source


def test_hls_says_it_has_no_depth_routing(tmp_path, capsys):
    assert main(["compile", os.path.join(EXAMPLES, "video_depth.moe"), "--target", "hls",
                 "-o", str(tmp_path / "o")]) == 1
    assert "does not support Mixture-of-Depths" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("depth,code,needle,message", [
    ("0.5", "E0206", "0.5", "`depth` must be a depth router"),
    ("keep(0.5)", "E0206", "keep(0.5)", "`depth` must be a depth router"),
    ("keep_top(1.5)", "E0207", "keep_top(1.5)", "the kept ratio must be in (0, 1]"),
    ("keep_top(0)", "E0207", "0", "must be positive"),
    ("keep_top(layer_linear(1.0, 0.0))", "E0207", "keep_top(", "the kept ratio must be in (0, 1]"),
    ("keep_top(layer_cosine(1.0, 0.5, shift = 1))", "E0207", "keep_top(", "`shift` must be below 1"),
    ("keep_top(cosine(1.0, 0.5, steps = 4))", "E0205", "cosine(", "must be a number or a per-layer schedule"),
    ("keep_top(0.5, modalities = [audio])", "E0202", "audio", "modality `audio` is not carried by the input"),
    ("keep_top(0.5, weight = relu)", "E0206", "weight = relu", "`weight` must be one of sigmoid, tanh"),
    ("keep_top(0.5, capacity = 2)", "E0204", "capacity = 2", "has no parameter `capacity`"),
])
def test_depth_misuse(tmp_path, depth, code, needle, message):
    src = DEPTH.format(depth=depth, settings="", attention="attention(heads = 2)", ffn="glu(d, 24)")
    diags = check(_write(tmp_path, src))
    assert [d.code for d in diags.items] == [code], diags.render()
    assert message in diags.items[0].message
    at = src.index("depth = ") + len("depth = ") + depth.index(needle)
    assert (diags.items[0].loc.line, diags.items[0].loc.col) == (src.count("\n", 0, at) + 1,
                                                                 at - src.rfind("\n", 0, at))


def test_latent_attention_has_no_depth_form(tmp_path):
    src = DEPTH.format(depth="keep_top(0.5)", settings="", ffn="glu(d, 24)",
                       attention="latent_attention(heads = 2, kv_rank = 8, qk_nope_dim = 4, qk_rope_dim = 4, v_dim = 4)")
    diags = check(_write(tmp_path, src))
    assert [d.code for d in diags.items] == ["E0220"] and "no Mixture-of-Depths form" in diags.items[0].message


def test_recurrent_router_has_no_depth_form(tmp_path):
    src = DEPTH.format(depth="keep_top(0.5)", settings="", attention="attention(heads = 2)",
                       ffn="moe { experts 4 x glu(d, 8); router top_k(k = 1); recurrent = gru(hidden = 8) }")
    diags = check(_write(tmp_path, src))
    assert "E0220" in [d.code for d in diags.items], diags.render()
    assert any("no Mixture-of-Depths form" in d.message for d in diags.items)


def test_a_block_setting_given_twice_is_an_error(tmp_path):
    src = DEPTH.format(depth="keep_top(0.5); depth = keep_top(0.3)", settings="", attention="attention(heads = 2)",
                       ffn="glu(d, 24)")
    diags = check(_write(tmp_path, src))
    assert [d.code for d in diags.items] == ["E0203"] and "`depth` is already given" in diags.items[0].message



MASKED_MOE = """
model masked {
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  expert ffn = glu(d, 24)
  block grouped {
    depth = keep_top(0.5, modalities = [image], weight = tanh)
    attention(heads = 2)
    moe {
      group text { experts 4 x ffn; router group_limited(k = 2, groups = 2, top_groups = 1, bias_update = 0.01) }
      group image { experts 4 x ffn; router top_k(k = 1) }
      loss load_balance(0.01)
    }
  }
  block plain {
    depth = keep_top(0.4, modalities = [text])
    attention(heads = 2)
    moe { experts 4 x ffn; router group_limited(k = 2, groups = 2, top_groups = 2, bias_update = 0.01) }
  }
  layers { grouped plain }
}
"""


def test_static_depth_over_some_modalities_balances_and_exports(tmp_path):
    """The static form runs every token through a block whose route covers some modalities; the
    balancing bias counts only the kept tokens of each group (as the dynamic form's), in training;
    the model exports without nonzero or sort."""
    path = _write(tmp_path, MASKED_MOE, "masked.moe")
    dynamic, static = moec.load(path).double(), moec.load(path, static=True).double()
    torch.manual_seed(27)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    modality = torch.tensor([[1] * 9, [0, 1, 1, 0, 1, 1, 1, 0, 0]])
    a, b = dynamic(x, modality), static(x, modality)
    torch.testing.assert_close(a.output, b.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p, q) for p, q in zip(a.expert_counts, b.expert_counts))
    routed = {n: t for n, t in dynamic.named_buffers() if n.endswith("routed")}
    assert len(routed) == 2 and all(t.sum() > 0 for t in routed.values())
    for name, t in static.named_buffers():
        if name.endswith("routed"):
            assert torch.equal(t, routed[name]), name
    exported = torch.export.export(static.float().eval(), (x.float(), modality))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any(bad in t for t in targets for bad in ("nonzero", "sort", "index_add", "scatter_add")), targets


def test_static_depth_over_some_modalities_refuses_a_capacity(tmp_path):
    """A top_k capacity inside a depth block over some modalities depends on how many tokens the
    block keeps: the static form says so instead of ranking every token."""
    path = _write(tmp_path, MASKED_MOE.replace("router group_limited(k = 2, groups = 2, top_groups = 2, bias_update = 0.01)",
                                                  "router top_k(k = 2, capacity = 1.0)"), "cap.moe")
    with pytest.raises(moec.backends.BackendError,
                       match="the static form does not support a top_k capacity inside a Mixture-of-Depths block"):
        moec.load(path, static=True)
