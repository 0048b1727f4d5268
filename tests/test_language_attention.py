"""Attention options (rotary embeddings, q/k norm, output bias), `latent_attention` and the sigmoid
gate on shared experts: checks with positions, analyze's parameter counts against the generated
module, the rotary formula against a plain complex-number rotation, and unfused == fused numerics."""

from __future__ import annotations

import math

import moec
import pytest
import torch
from moec.backends.pytorch import runtime as rt
from moec.driver import check, compile_model

BASE = """model m {
  input(dim = 16)
  block b { attention(heads = 2); glu(16, 32) }
  layers { b }
}
"""

FULL = """model full {
  const d = 32
  input(dim = d)
  expert e = glu(d, 16)

  block rotary {
    norm = rms(eps = 1e-5)
    attention(heads = 4, kv_heads = 2, rope_theta = 500.0, qk_norm = head, bias = true, out_bias = false)
    moe { experts 4 x e; shared 1 x glu(d, 24); shared_gate = sigmoid; router top_k(k = 2, renormalize = true) }
  }
  block whole { attention(heads = 4, head_dim = 8, rope_theta = 10000.0, qk_norm = projection); e }
  block latent {
    latent_attention(heads = 2, kv_rank = 12, qk_nope_dim = 8, qk_rope_dim = 4, v_dim = 6, q_rank = 10,
                     rope_interleave = true, bias = true)
    moe { experts 8 x e; shared 2 x e; router group_limited(k = 2, groups = 4, top_groups = 2, bias_update = 0) }
  }
  block latent_direct { latent_attention(heads = 2, kv_rank = 8, qk_nope_dim = 4, qk_rope_dim = 4, v_dim = 4); e }
  layers { rotary; whole; latent; latent_direct }
}
"""


def _check(tmp_path, src: str):
    path = tmp_path / "m.moe"
    path.write_text(src)
    return check(str(path)), src


def _pos(src: str, needle: str) -> tuple[int, int]:
    at = src.index(needle)
    return src.count("\n", 0, at) + 1, at - (src.rfind("\n", 0, at) + 1) + 1


@pytest.mark.parametrize("code, change, needle, message", [
    ("E0206", ("heads = 2", "heads = 2, qk_norm = layer"), "qk_norm = layer", "`qk_norm` must be one of"),
    ("E0210", ("heads = 2", "heads = 2, head_dim = 5, rope_theta = 1e4"), "attention", "even head_dim"),
    ("E0207", ("heads = 2", "heads = 2, rope_theta = 0"), "rope_theta = 0", "must be positive"),
    ("E0205", ("attention(heads = 2)", "latent_attention(heads = 2, qk_nope_dim = 4, qk_rope_dim = 4, v_dim = 4)"),
     "latent_attention", "needs `kv_rank`"),
    ("E0210", ("attention(heads = 2)", "latent_attention(2, 8, 4, 3, 4)"), "latent_attention", "even qk_rope_dim"),
    ("E0211", ("glu(16, 32)", "moe { experts 4 x glu(16, 8); shared_gate = sigmoid; router top_k(k = 1) }"), "moe",
     "no shared experts"),
    ("E0204", ("glu(16, 32)", "moe { experts 4 x glu(16, 8); shared_gat = sigmoid; router top_k(k = 1) }"),
     "shared_gat", "unknown moe setting"),
    ("E0206", ("glu(16, 32)", ("moe { experts 4 x glu(16, 8); shared 1 x glu(16, 8); shared_gate = tanh; "
                               "router top_k(k = 1) }")), "tanh", "`shared_gate` must be one of none, sigmoid"),
])
def test_diagnostics(tmp_path, code, change, needle, message):
    d, src = _check(tmp_path, BASE.replace(*change))
    assert [x.code for x in d.items] == [code], d.render()
    assert message in d.items[0].message
    assert (d.items[0].loc.line, d.items[0].loc.col) == _pos(src, needle)


def test_analyze_counts_the_generated_parameters(tmp_path):
    path = tmp_path / "full.moe"
    path.write_text(FULL)
    analysis = compile_model(str(path)).results["analysis"]
    model = moec.load(str(path))
    assert analysis["params"]["total"] == sum(p.numel() for p in model.parameters())
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    assert [row["params"] for row in analysis["layers"]] == per_layer


def test_unfused_pipeline_same_numerics(tmp_path):
    path = tmp_path / "full.moe"
    path.write_text(FULL)
    x = torch.randn(2, 6, 32)
    fused, unfused = moec.load(str(path), seed=3), moec.load(str(path), seed=3, pipeline="unfused")
    torch.testing.assert_close(unfused(x).output, fused(x).output, atol=1e-5, rtol=1e-5)


def _rotate_complex(t: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """Plain reference: pair i of a [seq, dim] tensor is a complex number turned by pos * theta^(-2i/dim)."""
    seq, dim = t.shape
    half = dim // 2
    re, im = (t[:, 0::2], t[:, 1::2]) if interleaved else (t[:, :half], t[:, half:])
    out = torch.empty_like(t)
    for p in range(seq):
        for i in range(half):
            angle = p * theta ** (-2 * i / dim)
            z = complex(re[p, i].item(), im[p, i].item()) * complex(math.cos(angle), math.sin(angle))
            out[p, i], out[p, half + i] = z.real, z.imag
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_matches_complex_rotation(interleaved):
    t = torch.randn(5, 8, dtype=torch.float64)
    cos, sin = rt.rotary_cos_sin(5, 8, 100.0, "cpu", torch.float64)
    got = rt.apply_rotary(t, cos, sin, interleaved)
    torch.testing.assert_close(got, _rotate_complex(t, 100.0, interleaved), atol=1e-5, rtol=1e-5)


def test_rotary_attention_stays_causal_and_changes_the_result():
    """With rotary embeddings and q/k norm the first tokens' outputs still ignore later tokens
    (positions are 0..S-1 whatever S is), and the options do change the result."""
    torch.manual_seed(0)
    att = rt.Attention(16, heads=2, kv_heads=1, head_dim=8, rope_theta=10.0, qk_norm="head")
    x = torch.randn(1, 6, 16)
    full = att(x)
    torch.testing.assert_close(att(x[:, :3])[:, :3], full[:, :3], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rt.Attention(16, 2, 1, 8)(x), full)  # rotary and q/k norm change the result


def test_shared_gate_scales_by_sigmoid():
    torch.manual_seed(0)
    ff = rt.FeedForward(8, 16, glu=True, activation="silu", output_gate=True)
    x = torch.randn(4, 8)
    plain = rt.FeedForward(8, 16, glu=True, activation="silu")
    plain.load_state_dict({k: v for k, v in ff.state_dict().items() if not k.startswith("output_gate")})
    torch.testing.assert_close(ff(x), torch.sigmoid(x @ ff.output_gate.weight.T) * plain(x))
