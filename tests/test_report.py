"""`moec report`: parameters, active parameters and FLOPs per token, recomputed by hand.

Conventions (passes/analyze.py): FLOPs = 2 x multiply-accumulates of the weight GEMMs of one token's
forward pass (attention projections, router gate, experts); norms, activations, softmax, top-k and
attention's context-length terms are not counted. Active parameters are the weights a token reads:
attention, norms, the router of its group, k routed experts, shared experts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
from moec.cli import main
from moec.driver import compile_model
from moec.passes import REGISTRY
from moec.passes.manager import PassContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


# ---- by-hand formulas ----------------------------------------------------------------------------
def attention(d: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None) -> int:
    """q and o: d x heads*head_dim; k and v: d x kv_heads*head_dim (no biases)."""
    kv_heads = kv_heads or heads
    head_dim = head_dim or d // heads
    return 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim


def glu(d: int, hidden: int) -> int:  # gate, up, down
    return 3 * d * hidden


def mlp(d: int, hidden: int) -> int:  # up, down
    return 2 * d * hidden


def router(d: int, experts: int) -> int:
    return d * experts


def report_json(capsys, path: str) -> dict:
    assert main(["report", path, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


# ---- the three examples, by hand -------------------------------------------------------------------
def expected_mixtral() -> dict:
    path = example("mixtral.moe")
    text = read(path)
    assert "const d = 64, f = 3.5 * d, n_layers = 2" in text and "const experts = 8, k = 2" in text
    assert "attention(heads = 4, kv_heads = 2)" in text
    d, f, n_layers, experts, k = 64, int(3.5 * 64), 2, 8, 2
    attn, expert, gate, norms = attention(d, 4, 2), glu(d, f), router(d, experts), 2 * d
    layer = {"block": "decoder", "kind": "moe",
             "params": attn + experts * expert + gate + norms,
             "active": {"default": attn + k * expert + gate + norms},
             "flops": {"default": 2 * (attn + k * expert + gate)}}
    return {"path": path, "model": "mixtral", "modalities": ["default"], "layers": [layer] * n_layers,
            "final_norm": d}


def expected_deepseek() -> dict:
    path = example("deepseek_moe.moe")
    text = read(path)
    assert "const d = 64, dense_width = 4 * d, n_layers = 3" in text
    assert "const routed = 16, shared_experts = 2, k = 4" in text and "const fine = dense_width / 4" in text
    d, dense_width, n_layers, routed, shared, k = 64, 4 * 64, 3, 16, 2, 4
    fine = dense_width // 4
    attn, norms = attention(d, 4), 2 * d
    dense = {"block": "dense_layer", "kind": "dense",
             "params": attn + glu(d, dense_width) + norms,
             "active": {"default": attn + glu(d, dense_width) + norms},
             "flops": {"default": 2 * (attn + glu(d, dense_width))}}
    always = attn + router(d, routed) + shared * glu(d, fine)
    sparse = {"block": "moe_layer", "kind": "moe",
              "params": attn + router(d, routed) + routed * glu(d, fine) + shared * glu(d, fine) + norms,
              "active": {"default": always + k * glu(d, fine) + norms},
              "flops": {"default": 2 * (always + k * glu(d, fine))}}
    return {"path": path, "model": "deepseek_moe", "modalities": ["default"],
            "layers": [dense] + [sparse] * (n_layers - 1), "final_norm": d}


def expected_moma() -> dict:
    path = example("moma.moe")
    text = read(path)
    assert "const d = 64, f = 4 * d, blocks = 2" in text and "expert ffn = glu(d, f / 2, act = silu)" in text
    assert text.count("experts 4 x ffn; router top_k(k = 1)") == 2
    d, f, blocks, per_group, k = 64, 4 * 64, 2, 4, 1
    hidden = f // 2
    attn, expert, norms = attention(d, 4, 4), glu(d, hidden), 2 * d
    both = ("text", "image")
    dense = {"block": "dense", "kind": "dense", "params": attn + expert + norms,
             "active": dict.fromkeys(both, attn + expert + norms),
             "flops": dict.fromkeys(both, 2 * (attn + expert))}
    # each modality reads only its own group's router and experts
    group = router(d, per_group) + per_group * expert
    sparse = {"block": "sparse", "kind": "moe", "params": attn + 2 * group + norms,
              "active": dict.fromkeys(both, attn + router(d, per_group) + k * expert + norms),
              "flops": dict.fromkeys(both, 2 * (attn + router(d, per_group) + k * expert))}
    return {"path": path, "model": "moma", "modalities": list(both), "layers": [dense, sparse] * blocks,
            "final_norm": d}


ASYM = """model asym {
  const d = 32
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {
    attention(heads = 4, kv_heads = 1)
    moe {
      group text  { experts 8 x glu(d, 64); router top_k(k = 2) }
      group image { experts 4 x mlp(d, 128); shared 1 x mlp(d, 32); router top_k(k = 1) }
      shared 2 x glu(d, 16)
    }
  }
  layers { repeat 3 { b } }
}
"""


def expected_asym(tmp_path) -> dict:
    path = tmp_path / "asym.moe"
    path.write_text(ASYM)
    d = 32
    attn, norms, shared = attention(d, 4, 1), 2 * d, 2 * glu(d, 16)
    text_group = router(d, 8) + 8 * glu(d, 64)
    image_group = router(d, 4) + 4 * mlp(d, 128) + mlp(d, 32)
    text_active = attn + router(d, 8) + 2 * glu(d, 64) + shared
    image_active = attn + router(d, 4) + 1 * mlp(d, 128) + mlp(d, 32) + shared
    layer = {"block": "b", "kind": "moe", "params": attn + text_group + image_group + shared + norms,
             "active": {"text": text_active + norms, "image": image_active + norms},
             "flops": {"text": 2 * text_active, "image": 2 * image_active}}
    return {"path": str(path), "model": "asym", "modalities": ["text", "image"], "layers": [layer] * 3,
            "final_norm": d}


EXPECTED = {"mixtral": expected_mixtral, "deepseek_moe": expected_deepseek, "moma": expected_moma}


def totals(exp: dict) -> tuple[int, dict, dict]:
    total = sum(x["params"] for x in exp["layers"]) + exp["final_norm"]
    active = {m: sum(x["active"][m] for x in exp["layers"]) + exp["final_norm"] for m in exp["modalities"]}
    flops = {m: sum(x["flops"][m] for x in exp["layers"]) for m in exp["modalities"]}
    return total, active, flops


def assert_matches(report: dict, exp: dict) -> None:
    total, active, flops = totals(exp)
    assert report["model"] == exp["model"]
    assert report["modalities"] == exp["modalities"]
    assert report["params"]["total"] == total
    assert report["params"]["active_per_token"] == active
    assert report["flops_per_token"] == flops
    assert len(report["layers"]) == len(exp["layers"])
    for i, (got, want) in enumerate(zip(report["layers"], exp["layers"])):
        assert got["index"] == i
        assert (got["block"], got["kind"]) == (want["block"], want["kind"]), i
        assert got["params"] == want["params"], i
        assert got["active_params_per_token"] == want["active"], i
        assert got["flops_per_token"] == want["flops"], i


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_report_json_matches_hand_count(capsys, name):
    exp = EXPECTED[name]()
    assert_matches(report_json(capsys, exp["path"]), exp)


def test_report_json_asymmetric_modalities(capsys, tmp_path):
    exp = expected_asym(tmp_path)
    report = report_json(capsys, exp["path"])
    assert_matches(report, exp)
    assert report["params"]["active_per_token"]["text"] != report["params"]["active_per_token"]["image"]


def test_hand_counts_in_absolute_numbers():
    """The formulas above, pinned to numbers worked out on paper, so a wrong formula cannot hide."""
    assert totals(expected_mixtral())[:3] == (714_048, {"default": 197_952}, {"default": 395_264})
    assert totals(expected_deepseek())[:3] == (543_168, {"default": 248_256}, {"default": 495_616})
    assert totals(expected_moma())[:3] == (509_504, {"text": 164_928, "image": 164_928},
                                           {"text": 328_704, "image": 328_704})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_flops_are_twice_the_active_matmul_params(capsys, name):
    exp = EXPECTED[name]()
    report = report_json(capsys, exp["path"])
    norms = [2 * 64] * len(exp["layers"])  # two rms norms of width d = 64 per layer (no weights in matmuls)
    for m in exp["modalities"]:
        matmul = report["params"]["active_per_token"][m] - sum(norms) - exp["final_norm"]
        assert report["flops_per_token"][m] == 2 * matmul


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_report_json_keys(capsys, name):
    report = report_json(capsys, EXPECTED[name]()["path"])
    mods = report["modalities"]
    assert set(report) == {"model", "modalities", "params", "flops_per_token", "activation_bytes_per_token",
                           "layers"}
    assert set(report["params"]) == {"total", "active_per_token"}
    assert list(report["params"]["active_per_token"]) == mods
    assert list(report["flops_per_token"]) == mods
    assert list(report["activation_bytes_per_token"]) == mods
    for layer in report["layers"]:
        assert set(layer) - {"fusion", "routing"} == {"index", "block", "kind", "params", "active_params_per_token",
                                           "flops_per_token", "activation_bytes_per_token"}
        assert ("fusion" in layer) == (layer["kind"] == "moe")
        assert layer["kind"] in ("dense", "moe")
        for key in ("active_params_per_token", "flops_per_token", "activation_bytes_per_token"):
            assert list(layer[key]) == mods and all(isinstance(v, int) and v > 0 for v in layer[key].values())
    # totals are the sums over layers (plus the final norm for parameters)
    assert report["params"]["total"] == sum(x["params"] for x in report["layers"]) + 64
    for m in mods:
        assert report["flops_per_token"][m] == sum(x["flops_per_token"][m] for x in report["layers"])
        assert report["activation_bytes_per_token"][m] >= sum(x["activation_bytes_per_token"][m]
                                                              for x in report["layers"])


def test_report_text(capsys):
    assert main(["report", example("mixtral.moe")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model mixtral\n")
    assert "parameters: 714,048" in out
    assert "default: 197,952 active per token, 395,264 FLOPs per token" in out
    assert "FLOPs = 2 x multiply-accumulates" in out
    assert "\n    0-1  decoder          moe      356.99K          98.94K      197.63K\n" in out  # identical layers once
    assert "\n    0-1  top_k " in out


def test_report_text_shows_each_run_of_identical_layers_once(capsys):
    """Consecutive layers with equal rows share one row led by their range; others keep their own."""
    assert main(["report", example("progressive_depth.moe")]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if " decoder " in line]
    assert rows == ["0-1", "2", "3", "4", "5"]
    keeps = [line.split()[0] for line in out.splitlines() if " keeps " in line]
    assert keeps == ["0-1", "2", "3", "4", "5"]


# ---- analyze before and after lower-moe -----------------------------------------------------------
def analyze_before_lowering(path: str) -> dict:
    comp = compile_model(path, stop_after="infer-shapes")
    assert comp.graph.find("moe")  # still unlowered
    ctx = PassContext()
    REGISTRY["analyze"]().run(comp.graph, ctx)
    return ctx.results["analysis"]


def _counts(a: dict) -> tuple:
    return (a["params"], a["flops_per_token"],
            [(x["index"], x["kind"], x["params"], x["active_params_per_token"], x["flops_per_token"])
             for x in a["layers"]])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_analyze_same_before_and_after_lower_moe(name):
    path = EXPECTED[name]()["path"]
    before = analyze_before_lowering(path)
    after = compile_model(path).results["analysis"]
    assert "lower-moe" in compile_model(path).results["passes_run"]
    assert _counts(before) == _counts(after)


def test_analyze_same_before_and_after_lower_moe_asym(tmp_path):
    path = expected_asym(tmp_path)["path"]
    assert _counts(analyze_before_lowering(path)) == _counts(compile_model(path).results["analysis"])


def test_analyze_same_before_and_after_lower_moe_shared_with_bias(tmp_path):
    path = tmp_path / "bias.moe"
    path.write_text("""model bias {
  const d = 32
  input(dim = d)
  block b {
    attention(heads = 4, bias = true)
    moe { experts 4 x mlp(d, 64, bias = true); shared 2 x mlp(d, 16, bias = true); router top_k(k = 2) }
  }
  layers { b }
}
""")
    d = 32
    shared = 2 * (mlp(d, 16) + 16 + d)  # each shared expert: weights, up bias, down bias
    before = analyze_before_lowering(str(path))
    after = compile_model(str(path)).results["analysis"]
    assert before["layers"][0]["params"] - after["layers"][0]["params"] == 0, (shared, before, after)


# ---- a DeepSeek-V3-sized description compiles fast ---------------------------------------------------
def _benchmark_module():
    spec = importlib.util.spec_from_file_location("moec_bench_frontend", os.path.join(ROOT, "benchmarks",
                                                                                        "frontend.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deepseek_v3_sized_compiles_under_one_second(tmp_path):
    bench = _benchmark_module()
    path = bench.write_source(str(tmp_path), 61, 256)
    compile_model(bench.write_source(str(tmp_path), 2, 4))  # warm-up (grammar, imports)
    best, comp = float("inf"), None
    for _ in range(2):
        start = time.perf_counter()
        comp = compile_model(path)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"compile_model took {best:.2f} s for 61 layers x 256 experts"
    # and the numbers are right: plain MHA with 128 heads of 128 stands in for MLA
    d, heads, hd = 7168, 128, 128
    attn = attention(d, heads, heads, hd)
    dense = attn + glu(d, 18432) + 2 * d
    sparse = attn + router(d, 256) + 256 * glu(d, 2048) + glu(d, 2048) + 2 * d
    a = comp.results["analysis"]
    assert a["params"]["total"] == 3 * dense + 58 * sparse + d == 686_414_984_192
    active = 3 * dense + 58 * (attn + router(d, 256) + 9 * glu(d, 2048) + 2 * d) + d
    assert a["params"]["active_per_token"] == {"default": active}
    assert len(a["layers"]) == 61 and [x["kind"] for x in a["layers"][2:4]] == ["dense", "moe"]


@pytest.mark.parametrize("m", [2, 4, 8])
def test_fine_grained_split_keeps_expert_flops_and_params(tmp_path, m):
    """DeepSeekMoE's fine-grained segmentation: N experts of width f at top-K become mN experts of
    width f/m at top-mK with the same expert parameters and FLOPs; only the router grows (m x)."""
    def analysis(n, width, k, name):
        src = (f"model fg {{ input(dim = 32); block b {{ moe {{ experts {n} x glu(32, {width}); "
               f"router top_k(k = {k}) }} }}; layers {{ b }} }}")
        path = tmp_path / name
        path.write_text(src)
        return compile_model(str(path)).results["analysis"]["layers"][0]

    coarse, fine = analysis(8, 64, 2, "coarse.moe"), analysis(8 * m, 64 // m, 2 * m, "fine.moe")
    router_growth = 32 * 8 * (m - 1)
    assert fine["params"] - coarse["params"] == router_growth
    assert fine["flops_per_token"]["default"] - coarse["flops_per_token"]["default"] == 2 * router_growth
    assert fine["active_params_per_token"]["default"] - coarse["active_params_per_token"]["default"] == router_growth


def test_a_layer_routed_by_task_is_an_moe_layer(capsys):
    """A moe whose experts a deterministic route picks (no router weights) is still an MoE layer."""
    assert main(["report", "--json", os.path.join(EXAMPLES, "hls", "task_experts.moe")]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [(layer["kind"], layer["routing"][0]["router"]) for layer in layers] == [("moe", "top_k"),
                                                                                  ("moe", "deterministic")]
