"""Static-shape dispatch (backends/pytorch/static_runtime.py), torch.export and the MLIR target.

The static functions are checked against the dynamic runtime (``moec_runtime.moe_experts`` and
friends), which tests/test_runtime.py checks against an independent per-token reference.
MLIR tests need torch-mlir (``pip install torch-mlir==20261001``) and are skipped without it.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys

import pytest
import torch
from moec.backends import mlir
from moec.backends.pytorch import runtime as rt
from moec.backends.pytorch import static_runtime as st
from torch import nn

# --------------------------------------------------------------------------- helpers

GRAD_NAMES = ["x", "weights", "up", "down", "gate", "ub", "db", "gb"]


def _experts(E, d, f, dtype, glu=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-2 if len(shape) > 2 else -1] ** 0.5
                ).to(dtype).requires_grad_(True)

    p = {"up": r(E, d, f), "down": r(E, f, d), "gate": r(E, d, f) if glu else None}
    p["ub"] = r(E, f) if bias else None
    p["db"] = r(E, d) if bias else None
    p["gb"] = r(E, f) if bias and glu else None
    return p


def _kwargs(p, activation):
    return {"gate_proj": p["gate"], "up_bias": p["ub"], "down_bias": p["db"], "gate_bias": p["gb"],
            "activation": activation}


def _inputs(T, d, k, E, dtype, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = ids.long()
    w = torch.rand(T, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x, ids, w


def _fwd_bwd(fn, x, w, p, seed=3):
    out = fn()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    tensors = [x, w, p["up"], p["down"], p["gate"], p["ub"], p["db"], p["gb"]]
    live = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad((out * probe).sum(), live, allow_unused=True))
    return out, [None if t is None else next(grads) for t in tensors]


def _assert_same(a, b, dtype, what=""):
    tol = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5)}[dtype]
    torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def _compare(x, ids, w, p, activation="silu", dtype=torch.float32, **static_kw):
    ref, ref_g = _fwd_bwd(lambda: rt.moe_experts(x, ids, w, p["up"], p["down"], **_kwargs(p, activation)), x, w, p)
    out, out_g = _fwd_bwd(
        lambda: st.moe_experts_static(x, ids, w, p["up"], p["down"], **_kwargs(p, activation), **static_kw), x, w, p)
    assert out.dtype == x.dtype and out.shape == x.shape
    _assert_same(out, ref, dtype, "forward")
    for name, a, b in zip(GRAD_NAMES, out_g, ref_g):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            _assert_same(a, b, dtype, f"grad of {name}")


# --------------------------------------------------------------------------- equivalence


def _skewed(T, k, E):  # every token's first slot -> expert 0, the others spread
    ids = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(E - 1)[: k - 1]]) for _ in range(T)])
    return ids


def _case(T, d, f, E, k, ids=None):
    return {"T": T, "d": d, "f": f, "E": E, "k": k, "ids": ids}


CASES = {
    "random": _case(37, 8, 12, 6, 2),
    "skewed": _case(29, 8, 12, 5, 3, lambda T, k, E: _skewed(T, k, E)),
    "one_expert": _case(20, 8, 8, 4, 1, lambda T, k, E: torch.full((T, k), 2)),
    "empty_experts": _case(16, 8, 8, 6, 2, lambda T, k, E: torch.tensor([[1, 4], [4, 1]]).repeat(T // 2, 1)),
    "dropped_slots": _case(15, 8, 8, 4, 2, lambda T, k, E: torch.where(torch.rand(T, k) < 0.3, -1,
                                                                      torch.randint(0, E, (T, k)))),
    "T1": _case(1, 8, 12, 4, 2),
    "T1_k1": _case(1, 4, 4, 1, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_moe_experts(case, dtype):
    torch.manual_seed(0)
    c = dict(CASES[case])
    make = c.pop("ids", None)
    T, d, f, E, k = c["T"], c["d"], c["f"], c["E"], c["k"]
    ids = make(T, k, E) if make else None
    if make and case == "dropped_slots":
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], -1, ids[:, 1])  # keep ids distinct per token
    x, ids, w = _inputs(T, d, k, E, dtype, ids)
    _compare(x, ids, w, _experts(E, d, f, dtype), dtype=dtype)


@pytest.mark.parametrize("activation,glu,bias", [("gelu", False, True), ("relu", True, True),
                                                 ("gelu_tanh", False, False), ("identity", True, False)])
def test_matches_moe_experts_forms(activation, glu, bias):
    x, ids, w = _inputs(23, 8, 2, 5, torch.float64)
    _compare(x, ids, w, _experts(5, 8, 6, torch.float64, glu=glu, bias=bias), activation, dtype=torch.float64)


def test_repeated_ids_need_capacity_t_times_k():
    """Default C = T is exact for distinct ids per token; repeated ids need capacity=T*k."""
    T, k, E = 6, 3, 2
    x, ids, w = _inputs(T, 4, k, E, torch.float64, ids=torch.zeros(T, k))
    p = _experts(E, 4, 4, torch.float64)
    _compare(x, ids, w, p, dtype=torch.float64, capacity=T * k)
    lossy = st.moe_experts_static(x, ids, w, p["up"], p["down"], gate_proj=p["gate"])
    assert not torch.allclose(lossy, rt.moe_experts(x, ids, w, p["up"], p["down"], gate_proj=p["gate"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["random", "none", "all"])
def test_token_mask_equals_selected_rows(pattern, dtype):
    T, d, f, E, k = 31, 8, 12, 5, 2
    x, ids, w = _inputs(T, d, k, E, dtype, seed=5)
    p = _experts(E, d, f, dtype, bias=True)
    mask = {"random": torch.rand(T, generator=torch.Generator().manual_seed(2)) < 0.4,
            "none": torch.zeros(T, dtype=torch.bool), "all": torch.ones(T, dtype=torch.bool)}[pattern]
    sel = mask.nonzero().squeeze(1)

    def dynamic():  # what the dynamic form does: select the rows, run, scatter back
        y = rt.moe_experts(x.index_select(0, sel), ids[sel], w.index_select(0, sel), p["up"], p["down"],
                           **_kwargs(p, "silu"))
        return torch.zeros_like(x).index_copy(0, sel, y)

    ref, ref_g = _fwd_bwd(dynamic, x, w, p)
    out, out_g = _fwd_bwd(lambda: st.moe_experts_static(x, ids, w, p["up"], p["down"], **_kwargs(p, "silu"),
                                                        token_mask=mask), x, w, p)
    _assert_same(out, ref, dtype, "forward")
    assert torch.count_nonzero(out[~mask]) == 0
    for name, a, b in zip(GRAD_NAMES, out_g, ref_g):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            _assert_same(a, b, dtype, f"grad of {name}")
    assert torch.count_nonzero(out_g[0][~mask]) == 0 and torch.count_nonzero(out_g[1][~mask]) == 0


def _kept_reference(ids, C, E, mask=None):
    """Ids with every slot beyond an expert's first C (token-major, then slot order) set to -1."""
    kept, seen = ids.clone(), [0] * E
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0 or e >= E or (mask is not None and not mask[t]) or seen[e] >= C:
                kept[t, j] = -1
            else:
                seen[e] += 1
    return kept


@pytest.mark.parametrize("C", [0, 1, 3, 7])
def test_capacity_drops_later_slots(C):
    T, d, f, E, k = 25, 8, 8, 4, 2
    x, ids, w = _inputs(T, d, k, E, torch.float64, ids=_skewed(25, 2, 4), seed=7)
    mask = torch.arange(T) % 5 != 1
    p = _experts(E, d, f, torch.float64)
    kept = _kept_reference(ids, C, E, mask)
    ref, ref_g = _fwd_bwd(lambda: rt.moe_experts(x, kept, w, p["up"], p["down"], gate_proj=p["gate"]), x, w, p)
    out, out_g = _fwd_bwd(lambda: st.moe_experts_static(x, ids, w, p["up"], p["down"], gate_proj=p["gate"],
                                                        capacity=C, token_mask=mask), x, w, p)
    _assert_same(out, ref, torch.float64, "forward")
    for name, a, b in zip(GRAD_NAMES, out_g, ref_g):
        if b is not None:
            _assert_same(a, b, torch.float64, f"grad of {name}")
    dropped = kept == -1
    assert torch.count_nonzero(out_g[1][dropped]) == 0  # dropped slots: exactly zero weight gradient
    assert int((~dropped).sum()) <= E * C
    if C == 0:
        assert torch.count_nonzero(out) == 0


def test_dropped_contribution_is_exactly_zero_even_if_padding_is_not_finite():
    """All tokens to expert 0 with C=2: only tokens 0 and 1 get output, the rest exactly 0."""
    T, d = 9, 4
    x, ids, w = _inputs(T, d, 1, 3, torch.float32, ids=torch.zeros(T, 1))
    p = _experts(3, d, 4, torch.float32, glu=False, bias=True)
    with torch.no_grad():
        p["db"][1:] = float("inf")  # padding rows of experts 1, 2 compute inf; never read
    out = st.moe_experts_static(x, ids, w, p["up"], p["down"], up_bias=p["ub"], down_bias=p["db"], capacity=2)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[:2].abs().sum(1)) == 2 and torch.count_nonzero(out[2:]) == 0


def test_positions_exact_under_autocast():
    """Rank counts run outside autocast: bf16 would round ranks above 256."""
    T, d, C = 600, 4, 300
    x, ids, w = _inputs(T, d, 1, 2, torch.float32, ids=torch.zeros(T, 1))
    p = _experts(2, d, 4, torch.float32, glu=False)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = st.moe_experts_static(x, ids, w, p["up"], p["down"], capacity=C)
        ref = st.moe_experts_static(x, ids, w, p["up"], p["down"], capacity=C)
    assert torch.count_nonzero(out[C:]) == 0 and bool((out[:C].abs().sum(1) > 0).all())
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


def test_empty_and_shape_errors():
    p = _experts(3, 4, 6, torch.float32)
    x, ids, w = _inputs(0, 4, 2, 3, torch.float32, ids=torch.zeros(0, 2))
    out = st.moe_experts_static(x, ids, w, p["up"], p["down"], gate_proj=p["gate"])
    assert out.shape == (0, 4)
    x, ids, w = _inputs(5, 4, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="token_mask"):
        st.moe_experts_static(x, ids, w, p["up"], p["down"], token_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="capacity"):
        st.moe_experts_static(x, ids, w, p["up"], p["down"], capacity=-1)
    with pytest.raises(ValueError, match="activation"):
        st.moe_experts_static(x, ids, w, p["up"], p["down"], activation="tanh")
    with pytest.raises(ValueError, match="down_proj"):
        st.moe_experts_static(x, ids, w, p["up"], p["up"])


# --------------------------------------------------------------------------- counts, losses, helpers


def test_counts_and_losses_match_dynamic_on_selected_rows():
    g = torch.Generator().manual_seed(11)
    T, E, k = 40, 6, 2
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    _, ids, probs = rt.route_top_k(logits, k)
    ids[3, 1] = -1
    assert torch.equal(st.expert_counts_static(ids, E), rt.expert_counts(ids, E))
    torch.testing.assert_close(st.load_balance_loss_static(probs, ids, E), rt.load_balance_loss(probs, ids, E))
    torch.testing.assert_close(st.z_loss_static(logits), rt.z_loss(logits))
    for mask in [torch.rand(T, generator=g) < 0.5, torch.ones(T, dtype=torch.bool)]:
        sel = mask.nonzero().squeeze(1)
        assert torch.equal(st.expert_counts_static(ids, E, mask), rt.expert_counts(ids[sel], E))
        torch.testing.assert_close(st.load_balance_loss_static(probs, ids, E, mask),
                                   rt.load_balance_loss(probs[sel], ids[sel], E), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.z_loss_static(logits, mask), rt.z_loss(logits[sel]), rtol=1e-12, atol=1e-12)
    none = torch.zeros(T, dtype=torch.bool)
    assert int(st.expert_counts_static(ids, E, none).sum()) == 0
    assert float(st.load_balance_loss_static(probs, ids, E, none)) == 0.0
    assert float(st.z_loss_static(logits, none)) == 0.0
    assert float(st.z_loss_static(logits[:0])) == 0.0
    assert float(st.load_balance_loss_static(probs[:0], ids[:0], E)) == 0.0
    # gradients of the masked losses flow only into the selected rows
    lg = logits.clone().requires_grad_(True)
    _, ids2, pr = rt.route_top_k(lg, k)
    mask = torch.arange(T) % 3 == 0
    (gr,) = torch.autograd.grad(st.load_balance_loss_static(pr, ids2, E, mask) + st.z_loss_static(lg, mask), [lg])
    assert torch.count_nonzero(gr[~mask]) == 0 and torch.count_nonzero(gr[mask]) > 0


def test_helpers():
    m = torch.tensor([0, 2, 1, 2, 0])
    assert st.token_mask_for(m, (2,)).tolist() == [False, True, False, True, False]
    assert st.token_mask_for(m, (0, 1)).tolist() == [True, False, True, False, True]
    assert not st.token_mask_for(m, ()).any()
    assert st.static_capacity(64, 2, 8) == 64
    assert st.static_capacity(64, 2, 8, 1.25) == 20
    assert st.static_capacity(64, 2, 8, 100.0) == 64 and st.static_capacity(1, 1, 64, 1.0) == 1


# --------------------------------------------------------------------------- torch.export

FORBIDDEN = {"nonzero", "sort", "argsort", "bincount", "cumsum", "scatter_add", "index_add", "_grouped_mm",
             "_local_scalar_dense", "item", "unique", "_unique2", "masked_select", "repeat_interleave",
             "scatter_reduce"}


class TinyMoE(nn.Module):
    """Router + static dispatch for two modality groups plus counts and losses (the static form)."""

    def __init__(self, d=16, f=24, E=4, k=2, capacity=None):
        super().__init__()
        self.k, self.E, self.capacity = k, E, capacity
        self.router = nn.ModuleList([nn.Linear(d, E, bias=False) for _ in range(2)])
        self.experts = nn.ModuleList([rt.Experts(E, d, f, glu=True, bias=True) for _ in range(2)])

    def forward(self, x, modality):
        y, aux, counts = torch.zeros_like(x), x.new_zeros(()), []
        for m in range(2):
            mask = st.token_mask_for(modality, (m,))
            logits = self.router[m](x)
            w, ids, probs = rt.route_top_k(logits, self.k, renormalize=True)
            ex = self.experts[m]
            y = y + st.moe_experts_static(x, ids, w, ex.up_proj, ex.down_proj, gate_proj=ex.gate_proj,
                                          up_bias=ex.up_bias, down_bias=ex.down_bias, gate_bias=ex.gate_bias,
                                          capacity=self.capacity, token_mask=mask)
            aux = aux + 0.01 * st.load_balance_loss_static(probs, ids, self.E, mask) + 1e-3 * st.z_loss_static(
                logits, mask)
            counts.append(st.expert_counts_static(ids, self.E, mask))
        return y, aux, torch.cat(counts)


def _tiny(T=12, capacity=None, seed=0):
    torch.manual_seed(seed)
    model = TinyMoE(capacity=capacity).eval()
    x, modality = torch.randn(T, 16), torch.randint(0, 2, (T,))
    return model, (x, modality)


def test_torch_export_has_no_data_dependent_ops():
    model, inputs = _tiny()
    ep = torch.export.export(model, inputs)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    bad = [t for t in targets if t.startswith("aten.") and t.split(".")[1] in FORBIDDEN]
    assert not bad, bad
    assert "aten.bmm.default" in targets and "aten.topk.default" not in targets  # top-k by comparisons
    # the exported graph is not specialised on the example's routing: new values, same results
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        x, mod = torch.randn(12, 16, generator=g), torch.randint(0, 2, (12,), generator=g)
        for a, b in zip(ep.module()(x, mod), model(x, mod)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- MLIR


def test_dialect_names_and_missing_torch_mlir(monkeypatch, tmp_path):
    assert mlir.output_type("linalg") == "linalg-on-tensors" == mlir.output_type("Linalg_On_Tensors")
    assert [mlir.output_type(n) for n in ("stablehlo", "tosa", "torch", "raw")] == ["stablehlo", "tosa", "torch",
                                                                                   "raw"]
    with pytest.raises(ValueError, match="unknown MLIR dialect 'spirv'"):
        mlir.output_type("spirv")
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # import torch_mlir -> ImportError
    monkeypatch.setitem(sys.modules, "torch_mlir.fx", None)
    model, inputs = _tiny()
    with pytest.raises(mlir.MlirUnavailableError, match=r"pip install torch-mlir==20261001.*moec\[mlir\]"):
        mlir.emit(model, inputs, str(tmp_path / "m.mlir"))
    assert not (tmp_path / "m.mlir").exists() and not mlir.available()


EXPECT = {  # dialect -> ops that must appear in its output
    "linalg": ["linalg.batch_matmul", "linalg.generic"],
    "stablehlo": ["stablehlo.dot_general", "stablehlo.scatter", "stablehlo.gather"],
    "tosa": ["tosa.matmul", "tosa.scatter", "tosa.gather"],
    "torch": ["torch.aten.bmm"],
}


@pytest.mark.parametrize("dialect", list(EXPECT))
def test_mlir_lowering(dialect, tmp_path):
    pytest.importorskip("torch_mlir")
    model, inputs = _tiny(capacity=5)
    out = tmp_path / "tiny.mlir"
    text = mlir.emit(model, inputs, str(out), dialect=dialect)
    assert out.read_text() == text
    assert "func.func" in text
    for op in EXPECT[dialect]:
        assert op in text, op
    if dialect != "torch":
        assert "torch.aten." not in text and "torch.operator" not in text


def test_mlir_lowering_error_is_reported(tmp_path):
    pytest.importorskip("torch_mlir")

    class Dynamic(nn.Module):  # the dynamic form: segment sizes read on the host
        def forward(self, x):
            return torch.stack([part.sum() for part in x.split(torch.bincount((x > 0).long()).tolist())])

    with pytest.raises(mlir.MlirLoweringError, match=r"linalg-on-tensors(.|\n)*moec compile --static"):
        mlir.emit(Dynamic(), (torch.randn(8),), str(tmp_path / "d.mlir"))
    assert not (tmp_path / "d.mlir").exists()


def test_mlir_missing_lowering_names_the_op_and_line(tmp_path, capfd):
    pytest.importorskip("torch_mlir")

    class StableSort(nn.Module):  # static shapes, but no dialect lowers a stable sort
        def forward(self, x):
            return torch.sort(x, stable=True).values

    with pytest.raises(mlir.MlirLoweringError) as err:
        mlir.emit(StableSort(), (torch.randn(8),), str(tmp_path / "s.mlir"))
    message = str(err.value)
    assert "torch-mlir has no lowering for `aten.sort.stable`" in message, message
    assert "torch.sort(x, stable=True)" in message and "test_static_mlir.py:" in message
    assert "moec compile --static" not in message  # not a static-form problem
    assert "error" not in capfd.readouterr().err  # MLIR's own diagnostics are not passed on


# Executing the linalg output: the reference-backend pipeline of torch-mlir's e2e tests, split
# between the torch-mlir-opt binary (TMTensor / refback passes) and the Python pass manager.
_OPT_1 = ["func.func(refback-generalize-tensor-pad)", "func.func(refback-generalize-tensor-concat)",
          "func.func(tm-tensor-bufferize)", "func.func(tm-tensor-to-loops)"]
_PY_1 = ["func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)", "convert-shape-to-std",
         ("one-shot-bufferize{copy-before-write bufferize-function-boundaries "
          "function-boundary-type-conversion=identity-layout-map}"), "inline"]
_OPT_2 = ["refback-mlprogram-bufferize", "refback-munge-calling-conventions", "func.func(refback-munge-memref-copy)"]
_PY_2 = ["func.func(convert-linalg-to-loops)", "func.func(lower-affine)", "convert-scf-to-cf",
         "func.func(arith-expand)", "func.func(convert-math-to-llvm)", "convert-math-to-libm",
         "expand-strided-metadata", "finalize-memref-to-llvm", "lower-affine", "convert-bufferization-to-memref",
         "finalize-memref-to-llvm", "func.func(convert-arith-to-llvm)", "convert-vector-to-llvm",
         "convert-func-to-llvm", "convert-cf-to-llvm", "convert-complex-to-llvm", "reconcile-unrealized-casts"]


def test_linalg_output_executes_and_matches_pytorch():
    pytest.importorskip("torch_mlir")
    opt = shutil.which("torch-mlir-opt")
    if opt is None:
        pytest.skip("torch-mlir-opt not on PATH")
    np = pytest.importorskip("numpy")
    from torch_mlir import ir
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager
    from torch_mlir.runtime import (
        UnrankedMemRefDescriptor,
        get_unranked_memref_descriptor,
        unranked_memref_to_numpy,
    )

    def run_opt(text, passes):
        r = subprocess.run([opt, f"--pass-pipeline=builtin.module({','.join(passes)})"], input=text,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr[:2000]
        return r.stdout

    def run_py(text, passes):
        ctx = ir.Context()
        module = ir.Module.parse(text, ctx)
        with ctx:
            PassManager.parse(f"builtin.module({','.join(passes)})").run(module.operation)
        return str(module)

    class OutputOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, modality):
            return self.inner(x, modality)[0]

    model, (x, modality) = _tiny(capacity=3)  # capacity 3 of 12 tokens: slots are dropped
    text = str(mlir.lower(OutputOnly(model), (x, modality), "linalg"))
    llvm = run_py(run_opt(run_py(run_opt(text, _OPT_1), _PY_1), _OPT_2), _PY_2)
    engine = ExecutionEngine(ir.Module.parse(llvm, ir.Context()), opt_level=2, shared_libs=[])
    result = {}

    @ctypes.CFUNCTYPE(None, ctypes.POINTER(UnrankedMemRefDescriptor))
    def consume(ptr):
        result["y"] = unranked_memref_to_numpy(ptr, np.float32).copy()

    engine.register_runtime("refbackend_consume_func_return_mrf32", consume)
    args = [ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a.numpy()))) for a in (x, modality)]
    engine.invoke("main", *args)
    expected = model(x, modality)[0].detach()
    torch.testing.assert_close(torch.from_numpy(result["y"]), expected, rtol=1e-5, atol=1e-6)


def test_emit_compilation_static_moma(tmp_path):
    """The registry adapter end to end; active once the PyTorch backend emits the static form."""
    pytest.importorskip("torch_mlir")
    import os

    from moec.backends.pytorch import emit as pytorch_emit
    from moec.driver import compile_model

    comp = compile_model(os.path.join(os.path.dirname(__file__), "..", "examples", "moma.moe"))
    try:
        files = pytorch_emit(comp, str(tmp_path / "py"), static=True)
    except TypeError:
        pytest.skip("the PyTorch backend has no static mode yet")
    assert "moma.py" in files
    if "moe_experts_static(" not in (tmp_path / "py" / "moma.py").read_text():
        pytest.skip("the PyTorch backend does not emit the static form yet")
    written = mlir.emit_compilation(comp, str(tmp_path / "mlir"), dialect="linalg", tokens=6)
    assert written == ["moma.mlir"]
    text = (tmp_path / "mlir" / "moma.mlir").read_text()
    assert "func.func @main" in text and "linalg.batch_matmul" in text


@pytest.mark.parametrize(("example", "dialect", "op"), [("mixtral", "linalg", "linalg.batch_matmul"),
                                                        ("moma", "linalg", "linalg.batch_matmul"),
                                                        ("mixtral", "stablehlo", "stablehlo.dot_general"),
                                                        ("moma", "tosa", "tosa.matmul"),
                                                        ("recurrent_router", "linalg", "linalg.batch_matmul"),
                                                        # a balancing router's non-persistent buffer
                                                        ("deepseek_v3_style", "linalg", "linalg.batch_matmul"),
                                                        ("dynamic_k", "tosa", "tosa.matmul"),
                                                        ("mixture_of_transformers", "stablehlo",
                                                         "stablehlo.dot_general"),
                                                        ("attention_experts", "tosa", "tosa.matmul"),
                                                        ("moma_depth", "tosa", "tosa.matmul"),
                                                        ("video_depth", "tosa", "tosa.matmul")])
def test_cli_mlir_target(example, dialect, op, tmp_path, capsys):
    pytest.importorskip("torch_mlir")
    import os

    from moec.cli import main

    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{example}.moe")
    assert main(["compile", path, "--target", "mlir", "--dialect", dialect, "-o", str(tmp_path)]) == 0
    text = (tmp_path / f"{example}.mlir").read_text()
    assert "func.func" in text and op in text, sorted(set(re.findall(r"\b[a-z_]+\.[a-z_]+", text)))[:40]
