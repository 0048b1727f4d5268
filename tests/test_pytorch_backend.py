"""Generated PyTorch modules against the plain reference in tests/reference.py (float64)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

import moec
import pytest
import torch
from moec.cli import main
from moec.driver import frontend
from reference import forward as reference_forward

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _check(path, x, modality=None, seed=0, perturb=None, task=None, step=0, static=False):
    model = moec.load(path, seed=seed, static=static).double()
    if perturb:
        perturb(model)
    spec = frontend(path)
    x = x.double().requires_grad_(True)
    out = model(x, modality, task) if task is not None else model(x, modality)
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    ref_x = x.detach().clone().requires_grad_(True)
    mod = modality if modality is not None else torch.zeros(x.shape[:-1], dtype=torch.long)
    ref_out, ref_aux, ref_counts = reference_forward(spec, params, ref_x, mod, task, step)
    torch.testing.assert_close(out.output, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.aux_loss.double(), ref_aux, rtol=1e-9, atol=1e-12)
    assert len(out.expert_counts) == len(ref_counts)
    for a, b in zip(out.expert_counts, ref_counts):
        assert torch.equal(a.cpu(), b)
    # backward: same loss on both sides, gradients of input and every parameter
    probe = torch.randn_like(ref_out)
    loss = (out.output * probe).sum() + out.aux_loss
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x] + [params[n] for n in names], allow_unused=True)
    ref_loss = (ref_out * probe).sum() + ref_aux
    ref_grads = torch.autograd.grad(ref_loss, [ref_x] + [params[n] for n in names], allow_unused=True)
    for name, g, r in zip(["x"] + names, grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m, n=name: f"grad of {n}: {m}")
    return model, out


ALL_EXAMPLES = sorted(f[:-4] for f in os.listdir(EXAMPLES) if f.endswith(".moe"))


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_examples_match_reference(example):
    torch.manual_seed(0)
    path = os.path.join(EXAMPLES, f"{example}.moe")
    modality = torch.randint(0, len(moec.load(path).modalities), (2, 5))
    _check(path, torch.randn(2, 5, 64), modality)


def test_moma_modality_groups_route_only_their_tokens():
    torch.manual_seed(1)
    modality = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]])
    _model, out = _check(os.path.join(EXAMPLES, "moma.moe"), torch.randn(2, 6, 64), modality)
    text, image = int((modality == 0).sum()), int((modality == 1).sum())
    for counts in out.expert_counts:  # top-1 in groups of 4: text experts first, then image experts
        assert counts[:4].sum() == text and counts[4:].sum() == image


def test_moma_empty_group():
    torch.manual_seed(2)
    _check(os.path.join(EXAMPLES, "moma.moe"), torch.randn(1, 4, 64), torch.zeros(1, 4, dtype=torch.long))


def _write(tmp_path, text, name="m.moe"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


ROUTING_MODEL = """
model routing {{
  const d = 16
  input(dim = d)
  block b {{
    {settings}
    attention(heads = 2, causal = {causal})
    moe {{
      experts 6 x {expert}
      router top_k(k = {k}, score = {score}, renormalize = {renorm}, scale = {scale})
      {extra}
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("case", [
    {"expert": "glu(d, 24, act = silu)", "k": 2, "score": "softmax", "renorm": "true", "scale": 1.0, "extra": "", "settings": "",
         "causal": "true"},
    {"expert": "mlp(d, 20, act = gelu, bias = true)", "k": 3, "score": "sigmoid", "renorm": "true", "scale": 2.5,
         "extra": "shared 2 x mlp(d, 8, act = relu)", "settings": "residual = post_norm", "causal": "false"},
    {"expert": "mlp(d, 20, act = relu, bias = true, weights = ternary)", "k": 2, "score": "softmax",
     "renorm": "true", "scale": 1.0, "extra": "shared 1 x glu(d, 8, weights = ternary)", "settings": "",
     "causal": "true"},
    {"expert": "glu(d, 12, act = gelu_tanh, bias = true)", "k": 1, "score": "sigmoid", "renorm": "false", "scale": 1.0,
         "extra": "", "settings": "norm = layer(eps = 1e-5)", "causal": "true"},
])
def test_router_and_expert_variants(tmp_path, case):
    torch.manual_seed(3)
    path = _write(tmp_path, ROUTING_MODEL.format(**case))
    _check(path, torch.randn(3, 7, 16))


def test_all_tokens_to_one_expert_and_ties(tmp_path):
    """Zero router weights make every score tie: all tokens pick the same k experts."""
    case = {"expert": "glu(d, 24)", "k": 2, "score": "softmax", "renorm": "false", "scale": 1.0, "extra": "", "settings": "",
                "causal": "true"}
    path = _write(tmp_path, ROUTING_MODEL.format(**case))

    def zero_routers(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("router.weight"):
                    p.zero_()

    torch.manual_seed(4)
    _, out = _check(path, torch.randn(2, 9, 16), perturb=zero_routers)
    for counts in out.expert_counts:
        assert sorted(counts.tolist()) == [0, 0, 0, 0, 18, 18]  # 4 empty experts, 2 take every token


def test_contract(tmp_path):
    model = moec.load(os.path.join(EXAMPLES, "moma.moe"))
    assert model.modalities == ("text", "image") and model.d_model == 64
    out = model(torch.randn(3, 64), torch.tensor([0, 1, 0]))
    assert out.output.shape == (3, 64) and out.aux_loss.shape == ()
    with pytest.raises(ValueError, match="modality"):
        model(torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        model(torch.randn(3, 65), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"modality ids must lie in \[0, 2\).*\[-1, 2\]"):
        model(torch.randn(4, 64), torch.tensor([0, 1, 2, -1]))  # ids of no declared modality
    model.check_ids = False  # no host sync; tokens of no declared modality go to no expert group
    assert [int(c.sum()) for c in model(torch.randn(4, 64), torch.tensor([0, 1, 2, -1])).expert_counts] == [2, 2]
    model.check_ids = True
    with pytest.raises(TypeError, match="x is torch.float64 but the model's parameters are torch.float32"):
        model(torch.randn(3, 64, dtype=torch.float64), torch.tensor([0, 1, 0]))
    for x in (torch.ones(3, 64, dtype=torch.long), [0.0] * 64):
        with pytest.raises(TypeError, match="x must be a floating-point torch.Tensor"):
            model(x, torch.tensor([0, 1, 0]))
    single = moec.load(os.path.join(EXAMPLES, "mixtral.moe"))
    assert single(torch.randn(4, 64)).output.shape == (4, 64)  # modality may be omitted
    # seeds: same seed same weights, other seed other weights
    a, b = moec.load(os.path.join(EXAMPLES, "mixtral.moe"), seed=7), moec.load(os.path.join(EXAMPLES, "mixtral.moe"), seed=7)
    c = moec.load(os.path.join(EXAMPLES, "mixtral.moe"), seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa) and not torch.equal(pa["layers.0.moe.router.weight"],
                                                                          pc["layers.0.moe.router.weight"])


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_examples_take_zero_tokens(example):
    """No tokens (an empty batch, empty sequences): empty outputs, zero counts, a finite aux loss."""
    model = moec.load(os.path.join(EXAMPLES, f"{example}.moe"))
    for shape in [(0, model.d_model), (2, 0, model.d_model), (0, 5, model.d_model)]:
        out = model(torch.randn(*shape), torch.zeros(shape[:-1], dtype=torch.long))
        assert out.output.shape == shape and bool(torch.isfinite(out.aux_loss))
        assert all(int(c.sum()) == 0 for c in out.expert_counts)


@pytest.mark.parametrize("name", ["forward", "training", "to", "__init__", "class"])
def test_names_of_module_attributes_and_keywords_are_safe(tmp_path, name):
    """A modality / group named like an nn.Module attribute or a keyword gets a `_` in Python."""
    source = Path(EXAMPLES, "moma.moe").read_text().replace("text", name)
    model = moec.load(_write(tmp_path, source))
    assert model.modalities == (name, "image")
    assert f"layers.1.moe.{name}_.router.weight" in dict(model.named_parameters())
    assert model(torch.randn(2, 5, 64), torch.randint(0, 2, (2, 5))).output.shape == (2, 5, 64)


@pytest.mark.parametrize("name", ["moec_runtime", "moec_triton", "math", "torch"])
def test_model_names_never_shadow_the_runtime_or_the_standard_library(tmp_path, name):
    source = Path(EXAMPLES, "mixtral.moe").read_text().replace("model mixtral", f"model {name}")
    path = _write(tmp_path, source)
    written = moec.compile(path, out=str(tmp_path / "out"))
    assert str(tmp_path / "out" / f"{name}_.py") in written
    assert moec.load(path)(torch.randn(3, 64)).output.shape == (3, 64)


def test_parameter_names_follow_the_source():
    names = set(dict(moec.load(os.path.join(EXAMPLES, "moma.moe")).named_parameters()))
    assert {"layers.1.moe.text.router.weight", "layers.1.moe.image.experts.gate_proj",
            "layers.0.ffn.down_proj.weight", "layers.0.attention.q_proj.weight", "final_norm.weight"} <= names
    names = set(dict(moec.load(os.path.join(EXAMPLES, "deepseek_moe.moe")).named_parameters()))
    assert {"layers.1.moe.shared.up_proj.weight", "layers.1.moe.experts.up_proj"} <= names


def test_parameter_count_matches_report(capsys):
    import json

    for example in ("mixtral", "deepseek_moe", "moma"):
        path = os.path.join(EXAMPLES, f"{example}.moe")
        n = sum(p.numel() for p in moec.load(path).parameters())
        assert main(["report", path, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["params"]["total"] == n, example


def test_compile_cli_writes_importable_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", os.path.join(EXAMPLES, "moma.moe"), "--target", "pytorch", "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["moec_cpu_fused.py", "moec_depth.py", "moec_expert_parallel.py",
                                       "moec_routers.py", "moec_runtime.py", "moec_static_runtime.py", "moma.py"]
    source = (out / "moma.py").read_text()
    assert "from moec_runtime import" in source and "import moec\n" not in source
    assert "# Host synchronisations per forward call" in source
    sys.path.insert(0, str(out))
    try:
        spec = importlib.util.spec_from_file_location("moma_generated", out / "moma.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(out))
    model = module.Model()
    y = model(torch.randn(2, 3, 64), torch.tensor([[0, 1, 1], [1, 0, 0]])).output
    assert y.shape == (2, 3, 64)


def test_unknown_target_is_a_clean_error(capsys):
    assert main(["compile", os.path.join(EXAMPLES, "moma.moe"), "--target", "tpu", "-o", "x"]) == 1
    err = capsys.readouterr().err
    assert "error[E0401]" in err and "Traceback" not in err


def test_keyword_identifiers_are_mangled(tmp_path):
    path = _write(tmp_path, """
model class {
  const d = 8
  modality def, import
  input(dim = d)
  expert lambda = mlp(d, 16)
  block return {
    attention(heads = 2)
    moe {
      group def { experts 2 x lambda; router top_k(k = 1) }
      group import { experts 2 x lambda; router top_k(k = 1) }
    }
  }
  layers { return }
}
""")
    model = moec.load(path)
    assert "layers.0.moe.def_.router.weight" in dict(model.named_parameters())
    out = model(torch.randn(4, 8), torch.tensor([0, 1, 1, 0]))
    assert out.output.shape == (4, 8)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = moec.load(os.path.join(EXAMPLES, "mixtral.moe"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.randn(4, 8, 64), torch.randn(4, 8, 64)
    losses = []
    for _ in range(5):
        out = model(x)
        loss = ((out.output - target) ** 2).mean() + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_train_lowers_the_loss(example, tmp_path, capsys):
    profile = tmp_path / "routing.json"
    rc = main(["train", os.path.join(EXAMPLES, f"{example}.moe"), "--steps", "8", "--tokens", "128",
               "--profile", str(profile)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(down)" in out and "load max/mean" in out
    import json

    data = json.loads(profile.read_text())
    spec = frontend(os.path.join(EXAMPLES, f"{example}.moe"))
    moe_layers = sum(1 for block in spec.layers for sub in block.sublayers if sub.op.kind == "moe")
    assert len(data["tokens_per_expert"]) == moe_layers  # a dense model (e.g. MoT) has none
    assert all(sum(layer) > 0 for layer in data["tokens_per_expert"])


def test_generated_code_is_deterministic_and_lint_clean(tmp_path):
    """Every example's generated files (PyTorch, its static form, Triton) pass ruff; compiling twice
    gives the same bytes."""
    import shutil
    import subprocess

    generated = []
    for example in (*ALL_EXAMPLES, "hls/task_experts"):
        name = os.path.basename(example)
        forms = [("pytorch", False), ("triton", False)] + [("pytorch", True)] * (example not in NO_STATIC_FORM)
        for target, static in forms:
            out = tmp_path / f"{name}_{target}_{static}"
            moec.compile(os.path.join(EXAMPLES, f"{example}.moe"), target=target, out=str(out), static=static)
            generated += [p for p in out.glob("*.py") if not p.name.startswith("moec_")]
    for example in ("mixtral", "moma"):
        again = tmp_path / "again"
        moec.compile(os.path.join(EXAMPLES, f"{example}.moe"), out=str(again))
        assert (again / f"{example}.py").read_bytes() == (tmp_path / f"{example}_pytorch_False" / f"{example}.py").read_bytes()
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    result = subprocess.run([ruff, "check", "--no-cache", "--isolated", "--select", "E,F,W,I,B,UP",
                             "--line-length", "120", *map(str, generated)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_single_token_fp32_matches_reference():
    model = moec.load(os.path.join(EXAMPLES, "deepseek_moe.moe"))
    spec = frontend(os.path.join(EXAMPLES, "deepseek_moe.moe"))
    x = torch.randn(1, 64)
    out = model(x)
    ref, aux, _ = reference_forward(spec, dict(model.named_parameters()), x, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, aux.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("example", ["mixtral", "deepseek_moe", "moma", "ternary_experts"])
def test_fused_and_unfused_ir_give_the_same_model(example):
    path = os.path.join(EXAMPLES, f"{example}.moe")
    fused, unfused = moec.load(path).double(), moec.load(path, pipeline="unfused").double()
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in unfused.named_parameters()]
    torch.manual_seed(5)
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    modality = torch.randint(0, len(fused.modalities), (2, 6))
    outs = []
    for model in (fused, unfused):
        out = model(x, modality)
        loss = (out.output * torch.linspace(-1, 1, 64, dtype=torch.float64)).sum() + out.aux_loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.output, b.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    for x_, y_ in zip(ga, gb):
        torch.testing.assert_close(x_, y_, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(a.expert_counts, b.expert_counts))


NO_STATIC_FORM = {"moma_expert_choice"}  # expert choice in a modality group: its capacity depends on the data


@pytest.mark.parametrize("example", [e for e in ALL_EXAMPLES if e not in NO_STATIC_FORM])
def test_static_form_matches_dynamic_and_exports(example):
    path = os.path.join(EXAMPLES, f"{example}.moe")
    dynamic, static = moec.load(path).double(), moec.load(path, static=True).double()
    torch.manual_seed(6)
    x = torch.randn(2, 5, dynamic.d_model, dtype=torch.float64)
    modality = torch.randint(0, len(dynamic.modalities), (2, 5))
    a, b = dynamic(x, modality), static(x, modality)
    torch.testing.assert_close(a.output, b.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p, q) for p, q in zip(a.expert_counts, b.expert_counts))
    ga = torch.autograd.grad(a.output.sum() + a.aux_loss, [p for p in dynamic.parameters() if p.requires_grad])
    gb = torch.autograd.grad(b.output.sum() + b.aux_loss, [p for p in static.parameters() if p.requires_grad])
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    exported = torch.export.export(static.float().eval(), (x.float(), modality))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    # none of the ops some MLIR dialect cannot lower (stable sort: none; sort, scatter_add, index_add: TOSA)
    assert not any(bad in t for t in targets for bad in ("nonzero", "bincount", "_grouped_mm", "sort", "scatter_add",
                                                        "index_add", "isin")), sorted(targets)
    source = inspect.getsource(inspect.getmodule(type(static)))
    assert "total per forward: 0" in source


TINY_GROUPS = """model tiny {
  const d = 32
  modality text, image
  input(dim = d, modalities = [text, image])
  expert ffn = glu(d, 2 * d, act = silu)
  block grouped { moe { group text { experts 4 x ffn; router top_k(k = 2) }
                        group image { experts 4 x ffn; router top_k(k = 1) } } }
  block shared { moe { experts 4 x ffn; shared 1 x ffn; router top_k(k = 2) } }
  layers { grouped shared }
}
"""


def test_torch_compile_matches_eager(tmp_path):
    """torch.compile traces the generated module (fp32 CPU): torch._grouped_mm's tracing form takes
    bf16 only, so the runtime takes another path while compiling. aot_eager: the traced forward and
    backward graphs without inductor's code generation."""
    path = tmp_path / "tiny.moe"
    path.write_text(TINY_GROUPS)
    model = moec.load(str(path))
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32, requires_grad=True)
    modality = torch.randint(0, 2, (2, 6))
    outs = []
    for run in (model, torch.compile(model, backend="aot_eager")):
        out = run(x, modality)
        outs.append((out.output, *torch.autograd.grad(out.output.pow(2).sum(), [x, *model.parameters()])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32: the paths sum in other orders


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "hls", "--static"], "--static does not apply to --target hls (--static is for pytorch / mlir)"),
    (["--dialect", "tosa", "--seed", "0"], ("--dialect, --seed do not apply to --target pytorch (--dialect is for "
                                            "mlir; --seed is for hls)")),
    (["--target", "mlir", "--seed", "1"], "--seed does not apply to --target mlir"),
])
def test_compile_options_of_another_target_are_errors(args, message, capsys, tmp_path):
    out = tmp_path / "o"
    assert main(["compile", os.path.join(EXAMPLES, "mixtral.moe"), *args, "-o", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_static_requires_fused_pipeline(capsys, tmp_path):
    rc = main(["compile", os.path.join(EXAMPLES, "mixtral.moe"), "--static", "--pipeline", "unfused",
               "-o", str(tmp_path / "o")])
    assert rc == 1
    assert "fused pipeline" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written


ROUTER_MODEL = """
model routers {{
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {{
    attention(heads = 2)
    moe {{
      experts 8 x glu(d, 12)
      router {router}
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("router", [
    "expert_choice(capacity = 1.0)",
    "expert_choice(capacity = 2.0, group_size = 7)",
    "dynamic_k(threshold = 0.5, k_min = 1, k_max = 4)",
    "soft()",
    "group_limited(k = 2, groups = 4, top_groups = 2, scale = 2.5)",
    "top_k(k = 2, capacity = 0.5)",
    "top_k(k = 2, capacity = 1.0, drop = probability)",
    "deterministic(by = modality)",
    "deterministic(by = hash)",
    "deterministic(by = task)",
])
def test_router_kinds_match_reference(tmp_path, router):
    path = _write(tmp_path, ROUTER_MODEL.format(router=router))
    torch.manual_seed(7)
    modality = torch.randint(0, 2, (2, 9))
    task = torch.randint(0, 8, (2, 9)) if "task" in router else None
    _check(path, torch.randn(2, 9, 16), modality, task=task)


HASHED = """
model hashed {
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block grouped {
    attention(heads = 2)
    moe { group text { experts 4 x glu(d, 12); router deterministic(by = hash) }
          group image { experts 3 x glu(d, 12); router top_k(k = 1) } }
  }
  block kept { depth = keep_top(0.5, modalities = [image]); moe { experts 5 x glu(d, 12); router deterministic(by = hash) } }
  layers { grouped kept }
}
"""


@pytest.mark.parametrize("static", [False, True])
def test_hash_routing_keys_on_the_position_in_the_sequence(tmp_path, static):
    """Hash routing's key is a token's position in its sequence (its original one in a
    Mixture-of-Depths block), inside a modality group too: a sequence's output does not depend on
    the batch around it or on the other sequences' modalities."""
    path = _write(tmp_path, HASHED)
    torch.manual_seed(8)
    x, modality = torch.randn(3, 7, 16), torch.randint(0, 2, (3, 7))
    model, out = _check(path, x, modality, static=static)
    alone = model(x[2:].double(), modality[2:]).output
    torch.testing.assert_close(out.output[2:], alone, rtol=0, atol=1e-12)
    other = modality.clone()
    other[0] = 1 - other[0]
    torch.testing.assert_close(model(x.double(), other).output[1:], out.output[1:], rtol=0, atol=1e-12)


def test_group_limited_bias_is_updated_by_after_step(tmp_path):
    path = _write(tmp_path, ROUTER_MODEL.format(router="group_limited(k = 2, groups = 4, top_groups = 2)"))
    model = moec.load(path)
    model.train()
    x, modality = torch.randn(4, 8, 16), torch.randint(0, 2, (4, 8))
    bias = model.layers[0].moe.router.score_bias
    assert torch.count_nonzero(bias) == 0
    model(x, modality)
    model.after_step()
    assert torch.count_nonzero(bias) > 0  # overloaded experts pushed down, idle ones up
    assert "layers.0.moe.router.score_bias" in model.state_dict()
    # with a non-zero bias the output still matches the reference (bias used for selection only)
    _check_model_bias = bias.clone()
    assert torch.equal(_check_model_bias, model.layers[0].moe.router.score_bias)


def test_task_routing_needs_task(tmp_path):
    model = moec.load(_write(tmp_path, ROUTER_MODEL.format(router="deterministic(by = task)")))
    with pytest.raises(ValueError, match="task"):
        model(torch.randn(3, 16), torch.zeros(3, dtype=torch.long))


def test_concurrent_writers_of_one_output_directory(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from moec.backends import write_tree

    out = tmp_path / "out"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: write_tree(str(out), {"a.py": "x = 1\n", "b/c.txt": "y"}), range(32)))
    assert (out / "a.py").read_text() == "x = 1\n" and (out / "b" / "c.txt").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


def test_ternary_weights_are_ternary_and_reported(capsys):
    import json

    from moec.backends.pytorch.runtime import ternarize

    w = torch.randn(3, 8, 5)
    q = ternarize(w)
    for e in range(3):
        levels = torch.unique(torch.round(q[e] / w[e].abs().mean() * 1e6) / 1e6)
        assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}
    g = torch.autograd.grad(ternarize(w.requires_grad_()).sum(), w)[0]
    assert torch.equal(g, torch.ones_like(w))  # straight-through
    assert main(["report", os.path.join(EXAMPLES, "ternary_experts.moe"), "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["ternary_weights"]
    n = 2 * 8 * 3 * 64 * 128  # layers x experts x (gate, up, down) x d x f; the shared expert is full precision
    assert t == {"params": n, "bytes_16bit": 2 * n, "bytes_2bit_packed": n // 4,
                 "bytes_log2_3_bound": round(n * 1.584962500721156 / 8)}


def test_file_errors_on_the_command_line_are_clean(tmp_path, capsys):
    path = os.path.join(EXAMPLES, "mixtral.moe")
    cases = [["compile", path, "--plan", str(tmp_path / "none.json"), "-o", str(tmp_path / "o")],
             ["train", path, "--steps", "1", "--profile", str(tmp_path / "no" / "dir" / "p.json")],
             ["report", "--plan", str(tmp_path / "none.json")]]
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "moec: error:" in err and "Traceback" not in err and "internal error" not in err, err


def test_a_model_too_large_for_this_machine_is_a_clear_error(tmp_path, capsys):
    """Checking and reporting work on any size; building it says why it cannot, before allocating."""
    path = _write(tmp_path, "model big { input(dim = 16); block b { attention(heads = 2); glu(16, 100000000000) }; "
                            "layers { b } }")
    assert main(["report", path]) == 0
    capsys.readouterr()
    assert main(["train", path, "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "moec: error:" in err and "parameters" in err and "more than this machine's" in err
    with pytest.raises(MemoryError):
        moec.load(path)
