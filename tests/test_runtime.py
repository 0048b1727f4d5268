"""Tests for backends/pytorch/runtime.py (the generated-code runtime, ``moec_runtime``).

Every numerical check compares against an independent fp64 reference written here with
explicit per-token loops and matmuls; the reference never calls runtime helpers.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

_RUNTIME_PATH = Path(__file__).resolve().parents[1] / "backends" / "pytorch" / "runtime.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# runtime.py imports its compiled kernels as a sibling module, as it does next to generated code
kernels = _load("moec_cpu_fused", _RUNTIME_PATH.with_name("cpu_fused.py"))
rt = _load("moec_runtime_under_test", _RUNTIME_PATH)

METHODS = ["grouped_mm", "split", "padded_bmm", "auto"]
CONCRETE = ["grouped_mm", "split", "padded_bmm"]


# --------------------------------------------------------------------------- reference


def _ref_act(name, t):
    if name == "silu":
        return t / (1.0 + torch.exp(-t))
    if name == "gelu":
        return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3)))
    if name == "relu":
        return t * (t > 0).to(t.dtype)
    if name == "identity":
        return t
    raise AssertionError(name)


def reference_moe(x, ids, w, up, down, gate=None, act="silu", ub=None, db=None, gb=None):
    """Plain per-token, per-slot loop in whatever dtype the inputs have (tests use fp64)."""
    T, d = x.shape
    rows = []
    for t in range(T):
        acc = torch.zeros(d, dtype=x.dtype)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e == -1:
                continue
            u = x[t] @ up[e]
            if ub is not None:
                u = u + ub[e]
            if gate is not None:
                g = x[t] @ gate[e]
                if gb is not None:
                    g = g + gb[e]
                h = _ref_act(act, g) * u
            else:
                h = _ref_act(act, u)
            y = h @ down[e]
            if db is not None:
                y = y + db[e]
            acc = acc + w[t, j] * y
        rows.append(acc)
    if not rows:
        return x[:0] * 0.0
    return torch.stack(rows)


# --------------------------------------------------------------------------- helpers


def make_problem(T=24, d=12, f=8, E=6, k=2, glu=True, bias=False, seed=0, ids=None):
    """fp64 leaf tensors; ``ids`` defaults to k distinct random experts per token."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_()

    p = {
        "x": rnd(T, d),
        "w": (torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1).requires_grad_(),
        "up": rnd(E, d, f, s=d**-0.5),
        "down": rnd(E, f, d, s=f**-0.5),
        "gate": rnd(E, d, f, s=d**-0.5) if glu else None,
        "ub": rnd(E, f, s=0.5) if bias else None,
        "db": rnd(E, d, s=0.5) if bias else None,
        "gb": rnd(E, f, s=0.5) if (bias and glu) else None,
    }
    if ids is None:
        ids = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :k]
    p["ids"] = ids
    return p


TENSOR_KEYS = ["x", "w", "up", "down", "gate", "ub", "db", "gb"]


def run_both(p, method, act="silu", dtype=torch.float32, gy_seed=1):
    """Run runtime (inputs cast to ``dtype``) and the fp64 reference; return outputs and grads."""
    T, d = p["x"].shape
    gy = torch.randn(T, d, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)

    ref = reference_moe(
        p["x"], p["ids"], p["w"], p["up"], p["down"], p["gate"], act, p["ub"], p["db"], p["gb"]
    )
    ref_inputs = [p[key] for key in TENSOR_KEYS if p[key] is not None]
    if ref.requires_grad:
        ref_grads = torch.autograd.grad(ref, ref_inputs, gy, allow_unused=True)
    else:  # nothing routed at all: every gradient is zero
        ref_grads = [None] * len(ref_inputs)

    low = {
        key: (None if p[key] is None else p[key].detach().to(dtype).requires_grad_()) for key in TENSOR_KEYS
    }
    out = rt.moe_experts(
        low["x"],
        p["ids"],
        low["w"],
        low["up"],
        low["down"],
        gate_proj=low["gate"],
        activation=act,
        up_bias=low["ub"],
        down_bias=low["db"],
        gate_bias=low["gb"],
        method=method,
    )
    low_inputs = [low[key] for key in TENSOR_KEYS if low[key] is not None]
    grads = torch.autograd.grad(out, low_inputs, gy.to(dtype), allow_unused=True)
    names = [key for key in TENSOR_KEYS if p[key] is not None]
    return out, ref, dict(zip(names, grads)), dict(zip(names, ref_grads))


def assert_close_all(out, ref, grads, ref_grads, tol=2e-5):
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    for name, ref_g in ref_grads.items():
        g = grads[name]
        if ref_g is None:
            ref_g = torch.zeros_like(g, dtype=torch.float64)
        assert g is not None, f"no grad for {name}"
        torch.testing.assert_close(
            g.double(), ref_g, rtol=tol, atol=tol, msg=lambda m, n=name: f"grad {n}: {m}"
        )


# --------------------------------------------------------------------------- moe_experts


def test_grouped_mm_really_used_on_this_build():
    p = make_problem()
    x32, up32, down32 = p["x"].float(), p["up"].float(), p["down"].float()
    if not rt.grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch._grouped_mm not usable on this build")
    assert rt.resolve_method("grouped_mm", x32, up32, down32, p["gate"].float(), k=2) == "grouped_mm"


def test_grouped_mm_probe_under_no_grad(monkeypatch):
    """A first call under no_grad (inference) must not find grouped_mm unusable for the process."""
    monkeypatch.setattr(rt, "_GMM_PROBE", {})
    with torch.no_grad():
        under_no_grad = rt.grouped_mm_available("cpu", torch.float32)
    monkeypatch.setattr(rt, "_GMM_PROBE", {})
    assert under_no_grad == rt.grouped_mm_available("cpu", torch.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference_forward_backward(method, glu, bias):
    p = make_problem(T=40, glu=glu, bias=bias, seed=3)
    out, ref, grads, ref_grads = run_both(p, method)
    assert out.dtype == torch.float32
    assert_close_all(out, ref, grads, ref_grads)


@pytest.mark.parametrize("method", CONCRETE)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "identity"])
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
@pytest.mark.parametrize("d, f", [(12, 8), (8, 12)], ids=["d>f", "d<f"])
def test_activations(method, act, glu, d, f):
    """Every activation, with the routing weight applied before (d > f) and after (d < f) the
    down projection."""
    p = make_problem(T=16, d=d, f=f, glu=glu, bias=True, seed=11)
    out, ref, grads, ref_grads = run_both(p, method, act=act)
    assert_close_all(out, ref, grads, ref_grads)


def test_activations_differ():
    """Guard against the activation argument being ignored."""
    p = make_problem(T=8, glu=False, seed=2)
    outs = {
        act: rt.moe_experts(
            p["x"].float(), p["ids"], p["w"].float(), p["up"].float(), p["down"].float(), activation=act
        )
        for act in ["silu", "gelu", "gelu_tanh", "relu", "identity"]
    }
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b], atol=1e-6), (a, b)


@pytest.mark.parametrize("method", METHODS)
def test_all_tokens_on_one_expert(method):
    T, E = 32, 8
    ids = torch.full((T, 1), 5, dtype=torch.long)
    p = make_problem(T=T, E=E, k=1, bias=True, ids=ids, seed=4)
    out, ref, grads, ref_grads = run_both(p, method)
    assert_close_all(out, ref, grads, ref_grads)
    others = [e for e in range(E) if e != 5]
    assert grads["up"][others].abs().max() == 0
    assert grads["gb"][others].abs().max() == 0
    assert grads["up"][5].abs().max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_skewed_two_slots(method):
    """Slot 0 always expert 0, slot 1 always expert 7: six experts empty."""
    T = 20
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 7, dtype=torch.long)], dim=1)
    p = make_problem(T=T, E=8, k=2, ids=ids, seed=5)
    out, ref, grads, ref_grads = run_both(p, method)
    assert_close_all(out, ref, grads, ref_grads)


@pytest.mark.parametrize("method", METHODS)
def test_empty_experts(method):
    g = torch.Generator().manual_seed(6)
    T, E = 30, 8
    used = torch.tensor([1, 4, 6])
    ids = used[torch.rand(T, 3, generator=g).argsort(dim=-1)[:, :2]]
    p = make_problem(T=T, E=E, k=2, ids=ids, bias=True, seed=6)
    out, ref, grads, ref_grads = run_both(p, method)
    assert_close_all(out, ref, grads, ref_grads)
    unused = [0, 2, 3, 5, 7]
    for name in ["up", "down", "gate", "ub", "db", "gb"]:
        assert grads[name][unused].abs().max() == 0, name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
def test_zero_tokens(method, glu):
    p = make_problem(T=0, k=2, glu=glu, bias=True)
    assert p["ids"].shape == (0, 2)
    up = p["up"].detach().float().requires_grad_()
    x = p["x"].detach().float().requires_grad_()
    out = rt.moe_experts(
        x,
        p["ids"],
        p["w"].detach().float(),
        up,
        p["down"].detach().float(),
        None if p["gate"] is None else p["gate"].detach().float(),
        up_bias=p["ub"].detach().float(),
        method=method,
    )
    assert out.shape == (0, 12) and out.dtype == torch.float32
    assert out.requires_grad
    out.sum().backward()
    assert up.grad is not None and up.grad.abs().max() == 0


@pytest.mark.parametrize("method", METHODS)
def test_dropped_slots(method):
    p = make_problem(T=24, k=3, E=6, bias=True, seed=7)
    ids = p["ids"].clone()
    ids[::3, 1] = -1  # some dropped slots
    ids[5] = -1  # a token with every slot dropped
    p["ids"] = ids
    out, ref, grads, ref_grads = run_both(p, method)
    assert_close_all(out, ref, grads, ref_grads)
    assert out[5].abs().max() == 0
    assert grads["w"][ids == -1].abs().max() == 0
    assert grads["w"][ids != -1].abs().min() > 0


@pytest.mark.parametrize("method", METHODS)
def test_all_slots_dropped(method):
    p = make_problem(T=10, k=2, seed=8, ids=torch.full((10, 2), -1, dtype=torch.long))
    out, ref, grads, ref_grads = run_both(p, method)
    assert out.abs().max() == 0
    assert_close_all(out, ref, grads, ref_grads)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_and_fp64(method):
    p = make_problem(T=32, d=16, f=16, E=4, k=2, seed=9)
    out, ref, _, _ = run_both(p, method, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0.05, atol=0.05)
    out64, ref64, grads64, ref_grads64 = run_both(p, method, dtype=torch.float64)
    assert out64.dtype == torch.float64
    assert_close_all(out64, ref64, grads64, ref_grads64, tol=1e-10)  # fp64 must not be squeezed through fp32


def test_grouped_mm_unaligned_falls_back():
    p = make_problem(T=12, d=6, f=5, E=3, k=2, seed=10)  # 6*4 and 5*4 bytes: not 16-byte aligned
    assert rt.resolve_method("grouped_mm", p["x"].float(), p["up"].float(), p["down"].float(), k=2) == "split"
    out, ref, grads, ref_grads = run_both(p, "grouped_mm")
    assert_close_all(out, ref, grads, ref_grads)


def test_auto_rule_on_cpu():
    E, d, f = 4, 8, 8
    up, down = torch.zeros(E, d, f), torch.zeros(E, f, d)
    grouped = "grouped_mm" if rt.grouped_mm_available("cpu", torch.float32) else "split"
    rows = {n: torch.zeros(n * E // 2, d) for n in (32, 48, 64, 500)}  # rows per expert at k=2
    # forward only: grouped_mm up to 32 rows per expert
    assert rt.resolve_method("auto", rows[32], up, down, k=2) == grouped
    assert rt.resolve_method("auto", rows[48], up, down, k=2) == "split"
    trained = up.clone().requires_grad_()  # a backward will run: grouped_mm while the sorted rows
    assert rt.resolve_method("auto", rows[500], trained, down, k=2) == grouped  # [T*k, max(d, f)] are small
    with torch.no_grad():
        assert rt.resolve_method("auto", rows[64], trained, down, k=2) == "split"
    # ... up to 4 MiB of them (T * k * max(d, f) * 4 bytes), then split
    big_up, big_down = torch.zeros(8, 512, 1024, requires_grad=True), torch.zeros(8, 1024, 512)
    assert rt.resolve_method("auto", torch.zeros(512, 512), big_up, big_down, k=2) == grouped  # 4 MiB
    assert rt.resolve_method("auto", torch.zeros(513, 512), big_up, big_down, k=2) == "split"
    with torch.no_grad():  # forward only: 128 rows per expert
        assert rt.resolve_method("auto", torch.zeros(512, 512), big_up, big_down, k=2) == "split"


def test_auto_bf16_cpu_uses_counts():
    E, d, f = 8, 16, 16
    x = torch.zeros(64, d, dtype=torch.bfloat16)
    up, down = torch.zeros(E, d, f, dtype=torch.bfloat16), torch.zeros(E, f, d, dtype=torch.bfloat16)
    balanced = [16] * E + [0]  # pad ratio 1.0
    skewed = [100] + [4] * (E - 1) + [0]  # pad ratio 8 * 100 / 128 = 6.25
    assert rt.resolve_method("auto", x, up, down, k=2, counts=balanced) == "padded_bmm"
    assert rt.resolve_method("auto", x, up, down, k=2, counts=skewed) != "padded_bmm"
    assert (
        rt.resolve_method("auto", x.float(), up.float(), down.float(), k=2, counts=balanced) != "padded_bmm"
    )


def test_bad_arguments():
    p = make_problem(T=4)
    args = (p["x"].float(), p["ids"], p["w"].float(), p["up"].float(), p["down"].float())
    with pytest.raises(ValueError):
        rt.moe_experts(*args, method="magic")
    with pytest.raises(ValueError):
        rt.moe_experts(*args, activation="swish2")
    with pytest.raises(ValueError):
        rt.moe_experts(p["x"].float(), p["ids"], p["w"].float(), p["up"].float(), p["up"].float())


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", CONCRETE)
def test_no_python_loop_over_tokens(method):
    """The number of dispatched aten ops (fwd + bwd) must not grow with T."""
    counts = []
    for T in (16, 64):
        ids = torch.arange(T * 2).remainder(6).view(T, 2)  # every expert non-empty
        p = make_problem(T=T, E=6, k=2, ids=ids, seed=12)
        x, up = p["x"].detach().float().requires_grad_(), p["up"].detach().float().requires_grad_()
        with _OpCounter() as counter:
            out = rt.moe_experts(
                x, ids, p["w"].float(), up, p["down"].float(), p["gate"].float(), method=method
            )
            out.sum().backward()
        counts.append(counter.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_host_sync_counts(method, dtype, monkeypatch):
    p = make_problem(T=20, d=16, f=16, E=6, k=2, seed=13)
    args = (
        p["x"].to(dtype),
        p["ids"],
        p["w"].float(),
        p["up"].to(dtype),
        p["down"].to(dtype),
        p["gate"].to(dtype),
    )
    rt.grouped_mm_available("cpu", dtype)  # the cached probe may sync; not part of a call
    resolved = rt.resolve_method(method, args[0], args[3], args[4], args[5], k=2)
    if method == "auto" and dtype == torch.bfloat16:
        expected = 1  # auto fetches the counts once on CPU for bf16 (and must not fetch them twice)
    else:
        expected = rt.HOST_SYNCS[resolved]
    calls = []
    for name in [
        "item",
        "tolist",
        "cpu",
        "numpy",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
    ]:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=original, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    rt.moe_experts(*args, method=method)  # the expert weights require grad: a backward will run
    training_calls = list(calls)
    calls.clear()
    with torch.no_grad():
        rt.moe_experts(*args, method=method)
    monkeypatch.undo()
    assert len(training_calls) == expected, training_calls
    assert len(training_calls) <= rt.HOST_SYNCS[method]
    # a forward alone: grouped_mm needs no segment sizes on the host
    with torch.no_grad():
        resolved_fwd = rt.resolve_method(method, args[0], args[3], args[4], args[5], k=2)
    counts_fetched = method == "auto" and dtype == torch.bfloat16
    assert len(calls) == (0 if resolved_fwd == "grouped_mm" and not counts_fetched else 1), calls
    assert rt.HOST_SYNCS["auto"] == max(rt.HOST_SYNCS[m] for m in CONCRETE)


# --------------------------------------------------------------------------- routing


def test_route_top_k_softmax():
    g = torch.Generator().manual_seed(20)
    logits = torch.randn(16, 8, generator=g, dtype=torch.float64)
    w, ids, probs = rt.route_top_k(logits.to(torch.bfloat16), k=3)
    assert probs.dtype == torch.float32 and w.dtype == torch.float32 and ids.dtype == torch.long
    lb = logits.to(torch.bfloat16).double()
    ref_probs = torch.exp(lb) / torch.exp(lb).sum(-1, keepdim=True)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-5, atol=1e-6)
    for t in range(16):
        order = sorted(range(8), key=lambda e: -float(ref_probs[t, e]))
        assert ids[t].tolist() == order[:3]
        torch.testing.assert_close(w[t].double(), ref_probs[t, order[:3]], rtol=1e-5, atol=1e-6)
    w2, ids2, _ = rt.route_top_k(logits, k=3, renormalize=True, scale=2.5)
    assert torch.equal(ids2, ids)
    torch.testing.assert_close(w2.sum(-1), torch.full((16,), 2.5, dtype=w2.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["compiled", "sort", "export"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_ties_go_to_the_lower_index(monkeypatch, path, dtype):
    """Every path of ``top_k`` (the CPU kernel, the stable sort elsewhere, rounds of max-and-take
    under torch.export) picks the k highest, highest first, ties to the lower index (-0.0 ties +0.0),
    as the Triton and HLS targets do; the values are gathered, with gradients."""
    if path == "compiled" and not kernels.available(dtype):
        pytest.skip(kernels.status())
    if path == "sort":
        monkeypatch.setattr(rt._cpu_fused, "available", lambda dtype: False)
    gen = torch.Generator().manual_seed(5)
    scores = (torch.randint(-3, 4, (64, 9), generator=gen) * 0.5).to(dtype)  # many ties
    scores[0] = 0.0
    scores[1] = torch.tensor([-0.0, 0.0, 2.0, float("-inf"), 2.0, -0.0, 1.0, float("inf"), 1.0])
    scores[2] = float("-inf")
    scores[2, 5] = 1.0  # fewer finite entries than k
    scores[3, 6] = scores[3, 2] = float("nan")  # NaN ranks first, as in a descending sort
    scores.requires_grad_()

    class TopK(torch.nn.Module):
        def forward(self, s):
            return rt.top_k(s, 4)

    if path == "export":
        values, ids = torch.export.export(TopK(), (scores.detach(),)).module()(scores.detach())
    else:
        values, ids = rt.top_k(scores, 4)
    for row, chosen in zip(scores.tolist(), ids.tolist()):
        assert chosen == sorted(range(9), key=lambda e: (not math.isnan(row[e]), -row[e], e))[:4]
    assert ids[3, :2].tolist() == [2, 6]
    assert ids[0].tolist() == [0, 1, 2, 3] and ids[1].tolist() == [7, 2, 4, 6] and ids[2].tolist() == [5, 0, 1, 2]
    torch.testing.assert_close(values, scores.detach().gather(1, ids), equal_nan=True)
    if path != "export":
        (grad,) = torch.autograd.grad(values.sum(), scores)
        assert torch.equal(grad, torch.zeros_like(grad).scatter(1, ids, 1.0))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_top_k_ties_go_to_the_lower_expert(score):
    logits = torch.zeros(5, 6)
    logits[3] = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 0.0])
    w, ids, probs = rt.route_top_k(logits, k=3, score=score)
    assert ids.tolist() == [[0, 1, 2]] * 3 + [[1, 2, 3]] + [[0, 1, 2]]
    torch.testing.assert_close(w, probs.gather(-1, ids))
    expected = 1 / 6 if score == "softmax" else 0.5
    torch.testing.assert_close(w[0], torch.full((3,), expected))


def test_route_top_k_sigmoid_bias_renormalize_scale():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, -2.0, 1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into every top-2
    w, ids, probs = rt.route_top_k(logits, k=2, score="sigmoid", renormalize=True, scale=1.5, bias=bias)
    sig = [[1.0 / (1.0 + math.exp(-v)) for v in row] for row in logits.tolist()]
    torch.testing.assert_close(probs, torch.tensor(sig))
    assert ids.tolist() == [[3, 0], [3, 1]]
    for t, (a, b) in enumerate(ids.tolist()):
        s = sig[t][a] + sig[t][b]
        expected = [1.5 * sig[t][a] / s, 1.5 * sig[t][b] / s]  # from UNbiased probs
        torch.testing.assert_close(w[t], torch.tensor(expected))
    w_nb, ids_nb, _ = rt.route_top_k(logits, k=2, score="sigmoid")
    assert ids_nb.tolist() == [[0, 1], [1, 3]]
    torch.testing.assert_close(w_nb[0], torch.tensor([sig[0][0], sig[0][1]]))


def test_route_top_k_zero_tokens():
    w, ids, probs = rt.route_top_k(torch.zeros(0, 5), k=2, score="sigmoid", renormalize=True)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and probs.shape == (0, 5)


def test_route_top_k_gradient_flows_to_logits():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(21)).requires_grad_()
    w, _, _ = rt.route_top_k(logits, k=2, renormalize=True)
    (w * torch.arange(2.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().max() > 0


def test_expert_counts():
    ids = torch.tensor([[0, 3], [3, -1], [2, 3], [-1, -1]])
    counts = rt.expert_counts(ids, 5)
    assert counts.dtype == torch.long
    assert counts.tolist() == [1, 0, 1, 3, 0]
    assert rt.expert_counts(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]
    mask = torch.tensor([True, False, True, True])  # token 1's slots are not counted
    assert rt.expert_counts(ids, 5, token_mask=mask).tolist() == [1, 0, 1, 2, 0]
    assert rt.expert_counts(ids, 5, token_mask=torch.zeros(4, dtype=torch.bool)).tolist() == [0] * 5


# --------------------------------------------------------------------------- losses


def test_load_balance_uniform_is_one():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.arange(T).remainder(E).view(T, 1)
    torch.testing.assert_close(rt.load_balance_loss(probs, ids, E), torch.tensor(1.0))


def test_load_balance_hand_formula():
    g = torch.Generator().manual_seed(30)
    T, E, k = 10, 5, 2
    probs = torch.softmax(torch.randn(T, E, generator=g), -1).double()
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    ids[2, 1] = -1
    ids[7, 0] = -1
    valid = [int(e) for e in ids.flatten().tolist() if e != -1]
    expected = 0.0
    for e in range(E):
        f_e = valid.count(e) / len(valid)
        p_e = sum(float(probs[t, e]) for t in range(T)) / T
        expected += f_e * p_e
    expected *= E
    loss = rt.load_balance_loss(probs.float().requires_grad_(), ids, E)
    assert loss.dim() == 0
    assert abs(float(loss.detach()) - expected) < 1e-6
    all_on_one = torch.zeros(T, 1, dtype=torch.long)
    skew = rt.load_balance_loss(torch.full((T, E), 1.0 / E), all_on_one, E)
    torch.testing.assert_close(skew, torch.tensor(1.0))  # f = (1,0,..), P = 1/E -> E * 1/E
    peaked = torch.zeros(T, E)
    peaked[:, 0] = 1.0
    torch.testing.assert_close(rt.load_balance_loss(peaked, all_on_one, E), torch.tensor(float(E)))


def test_load_balance_gradient_and_empty():
    probs = torch.softmax(torch.randn(6, 3), -1).requires_grad_()
    ids = torch.tensor([[0], [0], [0], [1], [2], [0]])
    rt.load_balance_loss(probs, ids, 3).backward()
    # d/dP_e (E * sum f_e P_e) with P_e = mean_t probs[t, e]  ->  E * f_e / T
    expected = torch.tensor([4 / 6, 1 / 6, 1 / 6]) * 3 / 6
    torch.testing.assert_close(probs.grad, expected.expand(6, 3))
    empty = rt.load_balance_loss(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long), 3)
    assert float(empty) == 0.0 and not torch.isnan(empty)


def test_z_loss():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    expected = 0.0
    for row in logits.tolist():
        lse = math.log(sum(math.exp(v) for v in row))
        expected += lse**2
    expected /= 2
    assert abs(float(rt.z_loss(logits)) - expected) < 1e-5
    assert abs(float(rt.z_loss(logits.to(torch.bfloat16))) - expected) < 0.1
    empty = rt.z_loss(torch.zeros(0, 4))
    assert float(empty) == 0.0 and not torch.isnan(empty)


def _imported_roots(path: Path) -> set[str]:
    import ast

    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_runtime_imports_only_torch_and_stdlib():
    """The runtime and its compiled kernels ship next to generated code: torch, the standard
    library and each other only."""
    import ast

    tree = ast.parse(_RUNTIME_PATH.read_text())
    assert _imported_roots(_RUNTIME_PATH) <= {"torch", "__future__", "math", "typing", "collections", "functools",
                                              "dataclasses", "threading", "moec_cpu_fused"}
    assert _imported_roots(_RUNTIME_PATH.with_name("cpu_fused.py")) <= {
        "torch", "__future__", "ctypes", "hashlib", "os", "platform", "shutil", "subprocess", "tempfile",
        "threading", "pathlib", "collections"}
    doc = ast.get_docstring(tree)
    for name in rt.__all__:
        assert name in doc, f"{name} not documented in the module docstring"


@pytest.mark.parametrize("glu,bias", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("d, f", [(8, 12), (12, 8)], ids=["d<f", "d>f"])
@pytest.mark.parametrize("method", ["split", "grouped_mm"])
def test_inference_path_equals_training_path(monkeypatch, method, d, f, glu, bias):
    """Under no_grad the split method keeps nothing for backward, and grouped_mm with SwiGLU
    experts runs the compiled epilogue with the routing weight (``_weighted_swiglu_rows``); both
    must give the training path's result."""
    dtype = torch.float64 if method == "split" else torch.float32  # grouped_mm: no fp64 on the CPU
    if method == "grouped_mm" and not rt.grouped_mm_available("cpu", dtype):
        pytest.skip("torch._grouped_mm does not run here")
    fused_calls, weighted_rows = [], rt._weighted_swiglu_rows
    monkeypatch.setattr(rt, "_weighted_swiglu_rows", lambda *a: fused_calls.append(1) or weighted_rows(*a))
    g = torch.Generator().manual_seed(3)
    T, E, k = 37, 6, 2
    x = torch.randn(T, d, generator=g, dtype=dtype)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[:5, 1] = -1  # dropped slots
    ids[ids == 3] = 2  # an empty expert
    w = torch.rand(T, k, generator=g, dtype=dtype)
    up, down = torch.randn(E, d, f, generator=g, dtype=dtype), torch.randn(E, f, d, generator=g, dtype=dtype)
    gate = torch.randn(E, d, f, generator=g, dtype=dtype) if glu else None
    biases = {}
    if bias:
        biases = {"up_bias": torch.randn(E, f, generator=g, dtype=dtype),
                  "down_bias": torch.randn(E, d, generator=g, dtype=dtype)}
        if glu:
            biases["gate_bias"] = torch.randn(E, f, generator=g, dtype=dtype)
    train = rt.moe_experts(x.requires_grad_(), ids, w, up, down, gate_proj=gate, method="split", **biases)
    with torch.no_grad():
        infer = rt.moe_experts(x, ids, w, up, down, gate_proj=gate, method=method, **biases)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(infer, train.detach(), rtol=tol, atol=tol)
    assert len(fused_calls) == (method == "grouped_mm" and glu and rt._cpu_fused.available(dtype))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 24, 200])  # 200: too many rows per expert, the split path
def test_groups_inference_matches_reference(monkeypatch, T, bias):
    """``moe_experts_groups`` without gradients runs one grouped GEMM chain per weight stack
    (``_GroupedExperts``, few rows per expert) or split (T=200); both must give the fp64
    reference over the stacks' concatenation, with an empty stack, dropped slots and biases."""
    if not rt.grouped_mm_available("cpu", torch.float32) or not rt._cpu_fused.available(torch.float32):
        pytest.skip("torch._grouped_mm or the compiled kernels do not run here")
    grouped, apply = [], rt._GroupedExperts.apply
    monkeypatch.setattr(rt._GroupedExperts, "apply", lambda *a: grouped.append(1) or apply(*a))
    g = torch.Generator().manual_seed(4)
    d, f, shapes = 8, 12, (3, 4, 2)  # three stacks; the last one gets no rows
    stacks = []
    for E in shapes:
        st = [torch.randn(E, d, f, generator=g), torch.randn(E, f, d, generator=g), torch.randn(E, d, f, generator=g)]
        st += [torch.randn(E, f, generator=g), torch.randn(E, d, generator=g), torch.randn(E, f, generator=g)] \
            if bias else [None] * 3
        stacks.append(tuple(st))
    x = torch.randn(T, d, generator=g)
    ids = torch.randint(0, shapes[0] + shapes[1], (T, 2), generator=g)
    ids[: T // 3, 1] = -1  # dropped slots
    w = torch.rand(T, 2, generator=g)
    with torch.no_grad():
        infer = rt.moe_experts_groups(x, ids, w, stacks)
    cat = [None if st[0] is None else torch.cat(st).double() for st in zip(*stacks)]
    ref = reference_moe(x.double(), ids, w.double(), cat[0], cat[1], cat[2], "silu", cat[3], cat[4], cat[5])
    torch.testing.assert_close(infer.double(), ref, rtol=2e-5, atol=2e-5)
    assert len(grouped) == (T < 200)


@pytest.mark.parametrize("bias, glu, act", [(False, True, "silu"), (True, True, "silu"), (True, False, "gelu")])
@pytest.mark.parametrize("T", [20, 300])
def test_groups_training_matches_reference(monkeypatch, T, bias, glu, act):
    """``moe_experts_groups`` with gradients against the fp64 reference over the stacks'
    concatenation: the grouped path at T=20 (one grouped GEMM chain per stack), split at T=300
    (rows over the limit); with an empty stack, dropped slots, biases, a plain MLP."""
    if not rt.grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run here")
    grouped, apply = [], rt._GroupedExperts.apply
    monkeypatch.setattr(rt._GroupedExperts, "apply", lambda *a: grouped.append(1) or apply(*a))
    monkeypatch.setattr(rt, "_CPU_GROUPED_MAX_ROWS_BYTES_TRAIN", 100 * 2 * 12 * 4)  # 100 tokens at k=2
    g = torch.Generator().manual_seed(14)
    d, f, shapes = 8, 12, (3, 4, 2)  # three stacks; the last one gets no rows

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5

    stacks = []
    for E in shapes:
        st = [rnd(E, d, f), rnd(E, f, d), rnd(E, d, f) if glu else None]
        st += [rnd(E, f), rnd(E, d), rnd(E, f) if glu else None] if bias else [None] * 3
        stacks.append(st)
    x, w = rnd(T, d), torch.rand(T, 2, generator=g, dtype=torch.float64)
    ids = torch.randint(0, shapes[0] + shapes[1], (T, 2), generator=g)
    ids[: T // 3, 1] = -1  # dropped slots
    leaves64 = [x, w] + [t for st in stacks for t in st if t is not None]
    for t in leaves64:
        t.requires_grad_()
    cat = [None if st[0] is None else torch.cat(st) for st in zip(*stacks)]
    ref = reference_moe(x, ids, w, cat[0], cat[1], cat[2], act, cat[3], cat[4], cat[5])
    gy = torch.randn(T, d, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves64, gy)
    low = {id(t): t.detach().float().requires_grad_() for t in leaves64}
    out = rt.moe_experts_groups(low[id(x)], ids, low[id(w)], [[None if t is None else low[id(t)] for t in st]
                                                             for st in stacks], activation=act)
    grads = torch.autograd.grad(out, list(low.values()), gy.float())
    assert grouped == ([1] if T == 20 else [])
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["split", "grouped_mm"])
def test_second_backward_is_a_clear_error(method):
    """The split and CPU grouped_mm paths free their saved rows in backward: a second backward
    through the same graph raises an error that says so instead of failing inside the loop."""
    p = {n: t.detach().float().requires_grad_() if t.is_floating_point() else t
         for n, t in make_problem(T=10, d=8, f=8, seed=12).items() if t is not None}
    if method == "grouped_mm" and not rt.grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    assert rt.resolve_method(method, p["x"], p["up"], p["down"], p["gate"], k=2) == method
    out = rt.moe_experts(p["x"], p["ids"], p["w"], p["up"], p["down"], gate_proj=p["gate"], method=method)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.sum().backward()


@pytest.mark.parametrize("method", ["split", "grouped_mm", "auto", "groups"])
def test_autocast_runs_the_experts_in_its_dtype(method):
    """Under CPU bf16 autocast the expert GEMMs run in bf16, as F.linear would: the same result
    and gradients as the call on bf16 copies of the inputs, with fp32 leaves receiving the
    gradients. The compiled SwiGLU kernels have no bf16 variant; they are not reached."""
    p = {n: t.detach().float().requires_grad_() if t.is_floating_point() else t
         for n, t in make_problem(T=40, d=16, f=16, E=4, seed=13, bias=True).items()}
    leaves = [p[n] for n in ("x", "w", "up", "down", "gate", "ub", "db", "gb")]

    def call(x, w, up, down, gate, ub, db, gb):
        if method == "groups":  # two stacks of two experts: the modality-groups call
            halves = [tuple(t[:2] for t in (up, down, gate, ub, db, gb)), tuple(t[2:] for t in (up, down, gate, ub, db, gb))]
            return rt.moe_experts_groups(x, p["ids"], w, halves)
        return rt.moe_experts(x, p["ids"], w, up, down, gate_proj=gate, up_bias=ub, down_bias=db, gate_bias=gb,
                              method=method)

    if method == "grouped_mm" and not rt.grouped_mm_available("cpu", torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run bf16 on this CPU build")
    gy = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(*leaves)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, leaves, gy.bfloat16())
    cast = [t.detach().bfloat16().requires_grad_() if t is not p["w"] else t.detach().clone().requires_grad_()
            for t in leaves]
    want = call(*cast)
    want_grads = torch.autograd.grad(want, cast, gy.bfloat16())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, ref, leaf in zip(grads, want_grads, leaves):
        assert got.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)


def test_autocast_dense_swiglu():
    """A dense SwiGLU FFN (shared experts) under CPU bf16 autocast: bf16 GEMMs through torch ops."""
    ffn = rt.FeedForward(16, 32, glu=True, activation="silu")
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
        want = F.linear(F.silu(F.linear(x, ffn.gate_proj.weight)) * F.linear(x, ffn.up_proj.weight),
                        ffn.down_proj.weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and ffn.up_proj.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------- RMSNorm


def _ref_rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.fixture(params=["compiled", "torch ops"])
def norm_kernels(request, monkeypatch):
    """Run a test with the compiled RMSNorm kernels and again with the torch-op path."""
    if request.param == "torch ops":
        monkeypatch.setattr(rt._cpu_fused, "available", lambda dtype: False)
    elif not rt._cpu_fused.available(torch.float32):
        pytest.skip(f"compiled kernels unavailable: {rt._cpu_fused.status()}")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (0, 16), (1, 1), (300, 1024), (2000, 96)])
def test_rms_norm_matches_reference(norm_kernels, dtype, shape):
    """The CPU path of ``RMSNorm`` (hand-written backward) against the formula in fp64; with torch
    ops (300, 1024) runs the backward in three chunks of rows, the last one partial; compiled,
    (2000, 96) splits the rows between threads (per-thread weight-gradient sums)."""
    g = torch.Generator().manual_seed(5)
    d = shape[-1]
    norm = rt.RMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=g).to(dtype)
    y = norm(x)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    ref = _ref_rms_norm(x64, w64, 1e-5)
    ref.backward(grad.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y.detach().double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, **tol)


def test_rms_norm_gradcheck_and_partial_grads(norm_kernels):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rt._RMSNormRows.apply(a.reshape(-1, 8), b, 1e-6), (x, w))
    norm = rt.RMSNorm(8, eps=1e-6).double()
    norm.weight.requires_grad_(False)  # a frozen norm: only d/dx
    norm(x).sum().backward()
    x64 = x.detach().clone().requires_grad_()
    _ref_rms_norm(x64, norm.weight, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad)
    norm.weight.requires_grad_(True)
    norm(x.detach()).pow(2).sum().backward()  # only d/dweight
    w64 = norm.weight.detach().clone().requires_grad_()
    _ref_rms_norm(x.detach(), w64, 1e-6).pow(2).sum().backward()
    torch.testing.assert_close(norm.weight.grad, w64.grad)


def test_rms_norm_other_dtypes_and_default_eps_follow_nn_rmsnorm():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 12, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        ours, theirs = rt.RMSNorm(12).to(dtype), torch.nn.RMSNorm(12).to(dtype)
        with torch.no_grad():
            ours.weight.copy_(torch.randn(12, generator=g))
            theirs.weight.copy_(ours.weight)
        torch.testing.assert_close(ours(x.to(dtype)), theirs(x.to(dtype)))
    assert isinstance(rt.RMSNorm(4), torch.nn.RMSNorm)  # same parameters, state dict and repr


def test_rms_norm_double_backward(norm_kernels):
    """create_graph=True (e.g. a gradient penalty) differentiates through the hand-written backward."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: rt._RMSNormRows.apply(a, b, 1e-6), (x, w))


# ---- reused weight-gradient memory of the split and grouped_mm paths (CPU) -------------------------
@pytest.fixture(params=["split", "grouped_mm"])
def grad_method(request):
    """The CPU paths that write stacked weight gradients into memory kept between steps."""
    if request.param == "grouped_mm" and not rt.grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    return request.param


def _expert_step(params, ids, seed, method, loss_scale=1.0):
    """One fwd+bwd of `method` on fp32 Parameters; returns the fp64 reference gradients of
    (up, down, gate) for the same inputs."""
    T, d = 10, params["up"].shape[1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = torch.rand(T, ids.shape[1], generator=g, dtype=torch.float64) + 0.1
    out = rt.moe_experts(x.float(), ids, w.float(), params["up"], params["down"],
                         gate_proj=params["gate"], method=method)
    (out.sum() * loss_scale).backward()
    ref_w = [params[n].detach().double().requires_grad_() for n in ("up", "down", "gate")]
    ref = reference_moe(x, ids, w, ref_w[0], ref_w[1], ref_w[2])
    return torch.autograd.grad(ref.sum() * loss_scale, ref_w)


def _expert_params(E=3, d=8, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"up": (E, d, f), "down": (E, f, d), "gate": (E, d, f)}
    return {n: torch.nn.Parameter(torch.randn(*s, generator=g) * 0.3) for n, s in shapes.items()}


def _check_grads(params, ref, scale=1.0):
    for n, r in zip(("up", "down", "gate"), ref):
        torch.testing.assert_close(params[n].grad.double(), r * scale, rtol=1e-4, atol=1e-5)


def test_weight_grads_reuse_memory_across_steps(grad_method):
    params = _expert_params()
    all_experts = torch.tensor([[0, 1], [1, 2], [2, 0]] * 3 + [[0, 2]])
    ref = _expert_step(params, all_experts, 1, grad_method)
    _check_grads(params, ref)
    first = {n: p.grad.data_ptr() for n, p in params.items()}
    for p in params.values():
        p.grad = None  # zero_grad()
    no_expert_0 = torch.tensor([[1, 2]] * 10)  # expert 0's rows from step 1 must not leak into step 2
    ref = _expert_step(params, no_expert_0, 2, grad_method)
    _check_grads(params, ref)
    assert {n: p.grad.data_ptr() for n, p in params.items()} == first
    assert params["up"].grad[0].abs().max() == 0


def test_weight_grads_not_reused_while_referenced(grad_method):
    params = _expert_params()
    ids = torch.tensor([[0, 1], [1, 2]] * 5)
    _expert_step(params, ids, 1, grad_method)
    kept = {n: p.grad for n, p in params.items()}  # e.g. a user keeps last step's gradients
    kept_values = {n: g.clone() for n, g in kept.items()}
    view = params["down"].grad[1]  # a view keeps the memory alive too
    for p in params.values():
        p.grad = None
    del kept["down"]
    ref = _expert_step(params, ids, 2, grad_method)
    _check_grads(params, ref)
    for n, g in kept.items():
        assert g.data_ptr() != params[n].grad.data_ptr()
        torch.testing.assert_close(g, kept_values[n], rtol=0, atol=0)
    torch.testing.assert_close(view, kept_values["down"][1], rtol=0, atol=0)


def test_weight_grads_accumulate_without_zero_grad(grad_method):
    params = _expert_params()
    ids = torch.tensor([[0, 2], [1, 2]] * 5)
    ref1 = _expert_step(params, ids, 1, grad_method)
    ref2 = _expert_step(params, ids, 2, grad_method, loss_scale=0.5)  # no zero_grad: .grad accumulates
    _check_grads(params, [a + b for a, b in zip(ref1, ref2)])


def test_weight_grads_from_autograd_grad_stay_valid(grad_method):
    params = _expert_params()
    ids = torch.tensor([[0, 1], [2, 1]] * 5)
    x = torch.randn(10, 8)
    results, method = [], grad_method
    for scale in (1.0, 2.0):
        out = rt.moe_experts(x, ids, torch.full((10, 2), 0.5), params["up"], params["down"],
                             gate_proj=params["gate"], method=method)
        results.append(torch.autograd.grad(out.sum() * scale, list(params.values())))
    for g1, g2 in zip(*results):
        torch.testing.assert_close(g2, 2 * g1)  # the second call did not write into the first's result


def test_weight_used_twice_in_one_graph(grad_method):
    params = _expert_params()
    ids_a, ids_b = torch.tensor([[0, 1]] * 10), torch.tensor([[1, 2]] * 10)
    ref_a = _expert_step(params, ids_a, 1, grad_method)
    for p in params.values():
        p.grad = None
    ref_b = _expert_step(params, ids_b, 2, grad_method)
    for p in params.values():
        p.grad = None
    g = torch.Generator()
    total, method = 0, grad_method
    for ids, seed in ((ids_a, 1), (ids_b, 2)):  # both calls in one graph, one backward
        g.manual_seed(seed)
        x = torch.randn(10, 8, generator=g, dtype=torch.float64)
        w = torch.rand(10, 2, generator=g, dtype=torch.float64) + 0.1
        total = total + rt.moe_experts(x.float(), ids, w.float(), params["up"], params["down"],
                                       gate_proj=params["gate"], method=method).sum()
    total.backward()
    _check_grads(params, [a + b for a, b in zip(ref_a, ref_b)])


def test_weight_grads_without_storage_use_count(monkeypatch, grad_method):
    monkeypatch.setattr(rt, "_STORAGE_USE_COUNT", None)  # a torch without the private counter: no reuse
    params = _expert_params()
    ids = torch.tensor([[0, 1], [1, 2]] * 5)
    _expert_step(params, ids, 1, grad_method)
    first = params["up"].grad
    for p in params.values():
        p.grad = None
    ref = _expert_step(params, ids, 2, grad_method)
    _check_grads(params, ref)
    assert params["up"].grad.data_ptr() != first.data_ptr()


# ---- LoRA experts without merged weights ----------------------------------------------------------
@pytest.mark.parametrize("rank, glu, bias, adapted, T", [
    (3, True, False, None, 10),  # adapters not 16-byte aligned: one mm per expert
    (4, True, True, None, 10),  # aligned: torch._grouped_mm
    (4, False, True, ("down",), 7),
    (4, True, False, ("up", "gate"), 1),
    (4, True, False, None, 0),
])
def test_moe_lora_experts_matches_merged_weights(monkeypatch, rank, glu, bias, adapted, T):
    torch.manual_seed(rank + T)
    E, d, f, k = 4, 16, 12, 2
    ex = rt.LoRAExperts(E, d, f, glu, bias, rank=rank, alpha=2 * rank, adapted=adapted)
    with torch.no_grad():
        for name, p in ex.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)
    x = torch.randn(T, d, requires_grad=True)
    ids = torch.rand(T, E).argsort(-1)[:, :k]
    if T > 3:
        ids[0, 0] = -1  # a dropped slot
        ids[1:, 0] = 2  # a skewed expert
    w = torch.rand(T, k, requires_grad=True)
    trained = [x, w] + [p for p in ex.parameters() if p.requires_grad]
    merged = rt.moe_experts(x, ids, w, ex.up_proj, ex.down_proj, gate_proj=ex.gate_proj, up_bias=ex.up_bias,
                            down_bias=ex.down_bias, gate_bias=ex.gate_bias)
    ref = torch.autograd.grad(merged.sum(), trained)

    def no_merging(name):
        raise AssertionError("moe_lora_experts built the merged weights")

    monkeypatch.setattr(ex, "_merged", no_merging)
    out = rt.moe_lora_experts(x, ids, w, ex)
    torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out.sum(), trained), ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ---- attention experts: sorted grouped projections vs one GEMM over every expert ------------------
@pytest.mark.parametrize("bias, kv_heads, rope, qk_norm, top_k, head_dim", [
    (False, 2, None, "none", 2, 8),  # 16-byte aligned projections: torch._grouped_mm
    (False, 2, None, "none", 2, 3),  # not aligned: one mm per expert
    (True, 1, 10000.0, "head", 1, 8),
    (True, 2, None, "projection", 3, 8),
])
def test_attention_experts_sorted_matches_dense(bias, kv_heads, rope, qk_norm, top_k, head_dim):
    torch.manual_seed(top_k)
    attn = rt.AttentionExperts(dim=16, heads=2, kv_heads=kv_heads, head_dim=head_dim, num_experts=4, top_k=top_k,
                               bias=bias, rope_theta=rope, qk_norm=qk_norm, load_balance=0.1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = {}
    for dispatch in ("dense", "sorted"):
        attn.dispatch = dispatch
        y, aux, counts = attn(x)
        grads = torch.autograd.grad((y * torch.arange(16.0)).sum() + aux, [x, *attn.parameters()])
        results[dispatch] = (y, counts, grads)
    (y_d, c_d, g_d), (y_s, c_s, g_s) = results["dense"], results["sorted"]
    torch.testing.assert_close(y_s, y_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(c_s, c_d)
    for a, b in zip(g_s, g_d):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    attn.dispatch = "fast"
    with pytest.raises(ValueError, match="dispatch must be"):
        attn(x)


# ---- compiled SwiGLU epilogue (moec_cpu_fused) ---------------------------------------------------
def _swiglu_reference(g, u, w, dhw):
    """fp64 formulas of the fused epilogue: h = silu(g) u, du, dg and the routing weight's gradient."""
    g, u, w, dhw = (t.double() for t in (g, u, w, dhw))
    s = torch.sigmoid(g)
    h = g * s * u
    dh = dhw * w
    return h, dh * g * s, dh * u * s * (1 + g * (1 - s)), (dhw * h).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, f", [(1, 1), (3, 13), (40, 256), (130, 200)], ids=str)
@pytest.mark.parametrize("weighted", [True, False])
def test_cpu_fused_match_formulas(dtype, n, f, weighted):
    """Both kernels against the fp64 formulas, with odd widths (vector tails), sizes under and over
    the threading threshold, and pre-activations far out in both tails (exp's clamped argument)."""
    if not kernels.available(dtype):
        pytest.skip(kernels.status())
    gen = torch.Generator().manual_seed(n * 1000 + f)
    g = (torch.randn(n, f, generator=gen) * 4).to(dtype)
    # far tails: x * exp(-x) overflows (fp32 beyond ~6e3, fp64 beyond ~2e4) if the kernel forms it
    extremes = torch.tensor([-150.0, 120.0, -90.0, 95.0, 0.0, -1e4, 1e4, -5e4, 5e4], dtype=dtype)
    m = min(len(extremes), g.numel())
    g.view(-1)[:m] = extremes[:m]
    u, dhw = (torch.randn(n, f, generator=gen).to(dtype) for _ in range(2))
    w = torch.rand(n, 1, generator=gen).to(dtype)
    h_ref, du_ref, dg_ref, dw_ref = _swiglu_reference(g, u, w, dhw)
    tol = {"rtol": 2e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    scale = w.double() if weighted else 1.0
    torch.testing.assert_close(kernels.swiglu_forward(g, u, w, weighted).double(), h_ref * scale, **tol)
    dw = torch.full((n,), float("nan"), dtype=dtype)
    kernels.swiglu_backward_(dhw, g, u, w, dw, weighted)  # in place: dhw <- h (w), u <- du, g <- dg
    torch.testing.assert_close(dhw.double(), h_ref * scale, **tol)
    torch.testing.assert_close(u.double(), du_ref, **tol)
    torch.testing.assert_close(g.double(), dg_ref, **tol)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * f)


@pytest.mark.parametrize("d, f", [(12, 8), (8, 12)], ids=["d>f", "d<f"])
@pytest.mark.parametrize("bias", [False, True])
def test_split_path_without_compiled_kernels(monkeypatch, d, f, bias):
    """The torch-op epilogue the split path runs where the kernels are unavailable (no compiler,
    MOEC_CPU_KERNELS=0, other activations) against the reference, and against the fused one in fp32."""
    p = make_problem(T=30, d=d, f=f, bias=bias, seed=13)
    fused = run_both(p, "split")
    monkeypatch.setattr(rt, "_fused_swiglu", lambda *args: False)
    out, ref, grads, ref_grads = run_both(p, "split")
    assert_close_all(out, ref, grads, ref_grads)
    torch.testing.assert_close(out, fused[0], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, fused[2][name], rtol=1e-5, atol=1e-6)


def test_cpu_fused_fall_back_cleanly(tmp_path):
    """Without a working compiler, or when disabled, the kernels report why and the split path
    still computes the same result with torch ops (fresh process: the library loads once)."""
    script = (f"import sys, torch; sys.path.insert(0, {str(_RUNTIME_PATH.parent)!r})\n"
              "import cpu_fused as k\n"
              "print(k.available(torch.float32)); print(k.status())\n")
    for env, expect in (({"CC": str(tmp_path / "no-such-cc")}, "failed"),
                        ({"MOEC_CPU_KERNELS": "0"}, "disabled by MOEC_CPU_KERNELS=0")):
        run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "MOEC_CACHE": str(tmp_path / "cache"), **env})
        assert run.returncode == 0, run.stderr
        available, status = run.stdout.splitlines()
        assert available == "False" and expect in status, run.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ternary", [False, True])
def test_feed_forward_fused_matches_torch_ops(monkeypatch, dtype, bias, ternary):
    """``FeedForward`` with SwiGLU on the compiled path (``_DenseSwiGLU``) against the same module
    run as torch ops: outputs and all gradients, 3-D input, output gate, second step, no tokens."""
    if not kernels.available(dtype):
        pytest.skip(kernels.status())
    torch.manual_seed(4)
    fused = rt.FeedForward(16, 24, glu=True, activation="silu", bias=bias, ternary=ternary, output_gate=True).to(dtype)
    plain = rt.FeedForward(16, 24, glu=True, activation="silu", bias=bias, ternary=ternary, output_gate=True).to(dtype)
    plain.load_state_dict(fused.state_dict())
    monkeypatch.setattr(plain, "_fused", lambda x: False)
    assert fused._fused(torch.zeros(1, 16, dtype=dtype))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12

    def close(a, b, name=""):  # absolute error relative to the tensor's scale (fp32 sums cancel)
        scale = float(b.detach().abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")

    for step, shape in enumerate([(3, 7, 16), (3, 7, 16), (2, 0, 16), (1, 16)]):
        x = torch.randn(shape, dtype=dtype) * (1 + 10 * step)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((fused, plain), xs)]
        gy = torch.randn_like(ys[0])
        for y in ys:
            y.backward(gy)
        close(ys[0], ys[1], "output")
        close(xs[0].grad, xs[1].grad, "x")
        for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
            close(a.grad, b.grad, name)
