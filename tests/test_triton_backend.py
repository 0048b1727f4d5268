"""Triton target: the generated kernels (run by Triton's CPU interpreter, fp32) against the PyTorch
backend, itself checked against tests/reference.py; outputs, aux losses, counts and gradients."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated
pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it

import moec
import torch
from moec.backends import BackendError
from moec.backends.pytorch.codegen import RUNTIME_MODULES
from moec.cli import main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _import(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compile_triton(path: str, out: str, text: str | None = None):
    """Compile with the CLI and import the generated package; returns (model module, kernels module)."""
    if text is not None:
        with open(path, "w") as fh:
            fh.write(text)
    assert main(["compile", path, "--target", "triton", "-o", out]) == 0
    files = sorted(os.listdir(out))
    # shared by every generated model, imported by name, in RUNTIME_MODULES order (each after its imports)
    order = [*RUNTIME_MODULES, "moec_triton"]
    runtimes = sorted((f for f in files if f.startswith("moec_")), key=lambda f: order.index(f[:-3]))
    for f in runtimes:
        _import(f[:-3], os.path.join(out, f))
    (kernels_file,) = [f for f in files if f.endswith("_kernels.py")]
    kernels = _import(kernels_file[:-3], os.path.join(out, kernels_file))
    model_file = kernels_file.replace("_kernels.py", ".py")
    return _import(f"triton_{model_file[:-3]}_{abs(hash(out))}", os.path.join(out, model_file)), kernels


def launcher():
    """The launcher module as the generated models last imported import it."""
    return sys.modules["moec_triton"]


def pair(path: str, out: str, text: str | None = None):
    """(PyTorch model, Triton model) with the same weights (the state dict moved over)."""
    triton_module, _ = compile_triton(path, out, text)
    ref = moec.load(path, seed=0)
    tri = triton_module.Model(seed=1)
    assert list(tri.state_dict()) == list(ref.state_dict())
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def assert_same(ref, tri, x, modality=None, atol=2e-5):
    xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    o_ref, o_tri = ref(xr, modality), tri(xt, modality)
    torch.testing.assert_close(o_tri.output, o_ref.output, rtol=1e-5, atol=atol)
    torch.testing.assert_close(o_tri.aux_loss, o_ref.aux_loss, rtol=1e-5, atol=1e-7)
    assert len(o_tri.expert_counts) == len(o_ref.expert_counts)
    for a, b in zip(o_tri.expert_counts, o_ref.expert_counts):
        assert torch.equal(a, b)
    probe = torch.randn_like(o_ref.output)
    ((o_ref.output * probe).sum() + o_ref.aux_loss).backward()
    ((o_tri.output * probe).sum() + o_tri.aux_loss).backward()
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=atol)
    ref_params = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        r = ref_params[name].grad
        if r is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}")
    return o_ref, o_tri


# ---------------------------------------------------------------------------- whole models
ALL_EXAMPLES = sorted(f[:-4] for f in os.listdir(EXAMPLES) if f.endswith(".moe"))


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_examples_match_pytorch_backend(example, tmp_path):
    """Every example: Mixtral-like, DeepSeek-like (shared + fine-grained), MoMa-like (two modality
    groups), group-limited routing, expert-choice routing (PyTorch routing feeding the expert
    kernels), ternary experts; 2 x 37 tokens: not a multiple of any block size."""
    path = os.path.join(EXAMPLES, f"{example}.moe")
    ref, tri = pair(path, str(tmp_path))
    torch.manual_seed(0)
    x = torch.randn(2, 37, 64)
    modality = torch.randint(0, len(ref.modalities), (2, 37)) if len(ref.modalities) > 1 else None
    assert_same(ref, tri, x, modality)


MOE_ONLY = """
model skew {
  const d = 32
  modality lambda, kernels
  input(dim = d, modalities = [lambda, kernels])
  expert ffn = glu(d, 48, act = silu)
  expert wide = mlp(d, 40, act = gelu, bias = true)
  block sparse {
    moe {
      group lambda { experts 8 x ffn; shared 1 x ffn; router top_k(k = 2, renormalize = true) }
      group kernels { experts 5 x wide; router top_k(k = 1, score = sigmoid) }
      loss load_balance(0.01), z_loss(0.001)
    }
  }
  layers { sparse }
  target triton { block_m = 16 }
}
"""


def test_skewed_routing_empty_experts_and_keyword_names(tmp_path):
    """Every token of a group routed to the same experts (the others empty), group names that are
    Python keywords / runtime names, two expert shapes (one launch per group), a group's own
    shared expert (masked to its tokens), MLP experts with biases."""
    ref, tri = pair(str(tmp_path / "skew.moe"), str(tmp_path / "out"), MOE_ONLY)
    source = (tmp_path / "out" / "skew.py").read_text()
    assert "self.moe.lambda_" in source and "Blocks(block_m=16)" in source
    torch.manual_seed(1)
    row = torch.randn(1, 32)
    x = row.expand(21, 32).contiguous()  # identical tokens: identical routing
    modality = torch.tensor([0] * 13 + [1] * 8)
    _, out = assert_same(ref, tri, x, modality)
    text_counts, image_counts = out.expert_counts[0][:8], out.expert_counts[0][8:]
    assert sorted(text_counts.tolist())[-2:] == [13, 13] and int((text_counts == 0).sum()) == 6
    assert image_counts.max() == 8 and int((image_counts == 0).sum()) == 4
    # one modality absent altogether: its group routes nothing
    assert_same(ref, tri, torch.randn(19, 32), torch.zeros(19, dtype=torch.long))


def test_tied_router_scores_pick_the_same_experts(tmp_path):
    """Zero routers (every score ties, as at a zero initialisation): both targets send every
    token to the lowest expert ids."""
    ref, tri = pair(str(tmp_path / "skew.moe"), str(tmp_path / "out"), MOE_ONLY)
    with torch.no_grad():
        for model in (ref, tri):
            for name, p in model.named_parameters():
                if name.endswith("router.weight"):
                    p.zero_()
    torch.manual_seed(3)
    modality = torch.tensor([0] * 9 + [1] * 6)
    _, out = assert_same(ref, tri, torch.randn(15, 32), modality)
    assert out.expert_counts[0].tolist() == [9, 9, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0]


DETERMINISTIC = """
model det {
  const d = 32
  modality text, image
  input(dim = d, modalities = [text, image])
  expert ffn = glu(d, 48, act = gelu_tanh)
  block sparse { moe { experts 2 x ffn; router deterministic(by = modality) } }
  block dense { ffn }
  layers { dense; sparse }
}
"""


def test_pytorch_routed_layers_feed_the_expert_kernels(tmp_path):
    """A router without a kernel (deterministic by modality) keeps its PyTorch routing, says so
    in the generated header, and its tokens still run on the expert kernels (tanh-GELU GLU)."""
    ref, tri = pair(str(tmp_path / "det.moe"), str(tmp_path / "out"), DETERMINISTIC)
    header = (tmp_path / "out" / "det.py").read_text().split('"""')[0]
    assert "SparseBlock.moe: deterministic router" in header
    torch.manual_seed(2)
    assert_same(ref, tri, torch.randn(3, 11, 32), torch.randint(0, 2, (3, 11)))


RECURRENT = """
model rec {
  const d = 32
  modality text, image
  input(dim = d, modalities = [text, image])
  expert ffn = glu(d, 48, act = silu)
  block sparse {
    moe {
      group text  { experts 4 x ffn; router top_k(k = 2, renormalize = true) }
      group image { experts 4 x ffn; router top_k(k = 1) }
      recurrent = gru(hidden = 16, projection = 24)
      loss load_balance(0.01), z_loss(0.001)
    }
  }
  block pooled {
    moe {
      group text { experts 3 x ffn; router expert_choice(capacity = 1.0) }
      experts 2 x ffn
      router top_k(k = 1)
      recurrent = gru(hidden = 16, projection = 24)
    }
  }
  block dense { ffn }
  layers { sparse dense sparse pooled }
}
"""


def test_recurrent_router_feeds_the_router_kernels(tmp_path):
    """RMoE: the GRU state (PyTorch) feeds the router kernels under the groups' token masks (one
    merged expert launch), and a PyTorch-routed group beside a pool; gradients cross the layers."""
    ref, tri = pair(str(tmp_path / "rec.moe"), str(tmp_path / "out"), RECURRENT)
    source = (tmp_path / "out" / "rec.py").read_text()
    assert "router_gru(" in source and "merge_groups(" in source and "fused_route(" in source
    torch.manual_seed(3)
    assert_same(ref, tri, torch.randn(2, 23, 32), torch.randint(0, 2, (2, 23)))


def test_group_limited_bias_selects_and_updates(tmp_path):
    """A non-zero selection bias changes which experts are chosen (not the weights); training
    steps update it identically in both backends."""
    path = os.path.join(EXAMPLES, "deepseek_v3_style.moe")
    ref, tri = pair(path, str(tmp_path))
    torch.manual_seed(3)
    with torch.no_grad():
        for model in (ref, tri):
            gen = torch.Generator().manual_seed(5)
            for name, buf in model.named_buffers():
                if name.endswith("score_bias"):
                    buf.copy_(torch.randn(buf.shape, generator=gen) * 0.5)
    x = torch.randn(29, 64)
    assert_same(ref, tri, x)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, tri)]
    for _ in range(2):
        for model, opt in zip((ref, tri), opts):
            opt.zero_grad()
            out = model(x)
            (out.output.square().mean() + out.aux_loss).backward()
            opt.step()
            model.after_step()
    for (name, a), b in zip(ref.state_dict().items(), tri.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- expert kernels
def _experts_case(num_experts, glu, bias, act):
    torch.manual_seed(0)
    d, f = 24, 40

    def w(*shape):
        return (torch.randn(*shape) * 0.2).requires_grad_(True)

    tensors = {"up_proj": w(num_experts, d, f), "down_proj": w(num_experts, f, d)}
    if glu:
        tensors["gate_proj"] = w(num_experts, d, f)
    if bias:
        tensors |= {"up_bias": w(num_experts, f), "down_bias": w(num_experts, d)}
        if glu:
            tensors["gate_bias"] = w(num_experts, f)
    return tensors, act


@pytest.mark.parametrize("case", ["all_to_one", "dropped_and_empty", "mlp_bias_gelu"])
def test_expert_kernels_match_runtime(case, tmp_path):
    """fused_experts against moec_runtime.moe_experts for hand-made routings: every pair on one
    expert, dropped slots (-1) and empty experts, an MLP with biases; 67 tokens, BLOCK_M 16."""
    compile_triton(str(tmp_path / "m.moe"), str(tmp_path / "out"), MOE_ONLY)
    kernels, runtime = sys.modules["skew_kernels"], launcher()
    reference = sys.modules["moec_runtime"].moe_experts
    E, T, k = 6, 67, 3
    glu, bias, act = (False, True, "gelu") if case == "mlp_bias_gelu" else (True, False, "silu")
    tensors, act = _experts_case(E, glu, bias, act)
    torch.manual_seed(1)
    if case == "all_to_one":
        ids = torch.full((T, k), 4)
        ids[:, 1:] = -1
    else:
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        ids[ids == 2] = -1  # expert 2 dropped everywhere: empty, and slots dropped
        ids[ids == 5] = 0  # expert 5 empty; ties of ids within a token are allowed
    x = torch.randn(T, 24, requires_grad=True)
    weights = torch.rand(T, k, requires_grad=True)
    got = runtime.fused_experts(kernels, x, ids, weights, activation=act, blocks=runtime.Blocks(block_m=16), **tensors)
    want = reference(x, ids, weights, activation=act, **tensors)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(want)
    inputs = [x, weights, *tensors.values()]
    g_got = torch.autograd.grad((got * probe).sum(), inputs)
    g_want = torch.autograd.grad((want * probe).sum(), inputs)
    for name, a, b in zip(["x", "weights", *tensors], g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_no_expert_loop_and_no_host_sync(tmp_path):
    """The launch sequence (kernels and grids) of a forward depends on shapes only: the same for
    uniform and fully skewed routing (nothing read back from the device between router and
    combine), and the same number of launches for 8 and 16 experts (no loop over experts)."""
    module, kernels = compile_triton(os.path.join(EXAMPLES, "mixtral.moe"), str(tmp_path))
    model, runtime = module.Model(seed=0), launcher()

    def launches(x):
        runtime.LAUNCHES = []
        try:
            with torch.no_grad():
                model(x)
            return runtime.LAUNCHES
        finally:
            runtime.LAUNCHES = None

    torch.manual_seed(0)
    uniform = launches(torch.randn(50, 64))
    skewed = launches(torch.randn(1, 64).expand(50, 64).contiguous())
    assert uniform == skewed
    names = [name for name, _ in uniform]
    assert names == ["router_0_kernel", "align_kernel", "expert_up_kernel", "expert_down_kernel"] * 2

    def expert_launches(num_experts):
        tensors, act = _experts_case(num_experts, True, False, "silu")
        x = torch.randn(40, 24)
        ids = torch.randint(0, num_experts, (40, 2))
        runtime.LAUNCHES = []
        try:
            with torch.no_grad():
                runtime.fused_experts(kernels, x, ids, torch.rand(40, 2), activation=act, **tensors)
            return [name for name, _ in runtime.LAUNCHES]
        finally:
            runtime.LAUNCHES = None

    assert expert_launches(8) == expert_launches(16) == ["align_kernel", "expert_up_kernel", "expert_down_kernel"]
    header = (tmp_path / "mixtral.py").read_text().split('"""')[0]
    assert "total per forward: 0" in header


# ---------------------------------------------------------------------------- generated code
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@pytest.mark.parametrize("kind", ["model", "kernels"])
def test_generated_moma_matches_golden(kind):
    """Generated code is reviewed like code: a change to it shows up as a diff of these files.
    To rewrite them after an intended change: MOEC_UPDATE_GOLDEN=1 python -m pytest -k golden"""
    from moec.backends.triton import render
    from moec.driver import compile_model

    comp = compile_model(os.path.join(EXAMPLES, "moma.moe"))
    files = render(comp.graph, "examples/moma.moe", comp.spec.targets)
    text = files["moma.py" if kind == "model" else "moma_kernels.py"]
    golden = os.path.join(GOLDEN, f"moma_triton_{kind}.txt")
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        with open(golden, "w") as fh:
            fh.write(text)
    with open(golden) as fh:
        assert text == fh.read(), f"generated {kind} file changed; review and rewrite {golden}"


# ---------------------------------------------------------------------------- command line
def test_bad_target_settings_are_user_errors(tmp_path, capsys):
    src = tmp_path / "bad.moe"
    for setting, message in (("block_m = 24", "error[E0206]: `block_m` must be a power of two >= 16, got 24"),
                             ("tile = 64", "error[E0204]: unknown triton setting `tile`")):
        src.write_text(MOE_ONLY.replace("block_m = 16", setting))
        for command in (["check", str(src)], ["compile", str(src), "--target", "triton", "-o", str(tmp_path / "o")]):
            assert main(command) == 1
            err = capsys.readouterr().err
            assert f"bad.moe:{MOE_ONLY.splitlines().index('  target triton { block_m = 16 }') + 1}:" in err
            assert message in err and "^" in err
    assert not (tmp_path / "o").exists()
    assert main(["compile", os.path.join(EXAMPLES, "mixtral.moe"), "--target", "triton", "--pipeline", "unfused",
                 "-o", str(tmp_path / "o")]) == 1
    assert "fused pipeline" in capsys.readouterr().err
    for flag in ("--static", "--plan"):
        plan = tmp_path / "plan.json"
        plan.write_text("{}")
        args = [flag] + ([str(plan)] if flag == "--plan" else [])
        assert main(["compile", os.path.join(EXAMPLES, "mixtral.moe"), "--target", "triton", *args,
                     "-o", str(tmp_path / "o")]) == 1
        assert capsys.readouterr().err.startswith(f"moec: error: {flag} does not apply to --target triton")
    with pytest.raises(BackendError, match="the triton target has no"):  # the Python API says it too
        moec.compile(os.path.join(EXAMPLES, "mixtral.moe"), target="triton", out=str(tmp_path / "o"), static=True)
    assert not (tmp_path / "o").exists()
