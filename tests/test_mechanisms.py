"""Zero-computation experts, the shared inter-modality pool and other routed-pool mechanisms:
generated modules against the plain reference, accounting invariants and misuse diagnostics."""

from __future__ import annotations

import moec
import pytest
import torch
from moec.cli import main
from moec.driver import check, compile_model
from test_pytorch_backend import _check, _write

ZERO_COMPUTATION = """
model zc {{
  const d = 16
  input(dim = d)
  block b {{
    attention(heads = 2)
    moe {{
      experts 4 x glu(d, 12)
      {pool}
      router {router}
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("pool,router", [
    ("experts 2 x identity; experts 1 x zero", "top_k(k = 2, renormalize = true)"),
    ("experts 3 x identity", "top_k(k = 3, score = sigmoid)"),
    ("experts 2 x zero", "top_k(k = 2, capacity = 0.75)"),
    ("experts 1 x identity; experts 1 x zero", "dynamic_k(threshold = 0.5, k_max = 3)"),
    ("experts 2 x identity", "expert_choice(capacity = 1.5)"),
])
def test_zero_computation_experts_match_reference(tmp_path, pool, router):
    path = _write(tmp_path, ZERO_COMPUTATION.format(pool=pool, router=router))
    torch.manual_seed(11)
    _, out = _check(path, torch.randn(2, 9, 16))
    assert out.expert_counts[0].numel() == 4 + sum(int(p.split()[1]) for p in pool.split(";"))


def test_all_tokens_to_zero_computation_experts(tmp_path):
    """Every token routed to identity/zero experts: the FFN experts are all empty and cost nothing."""
    path = _write(tmp_path, ZERO_COMPUTATION.format(pool="experts 1 x identity; experts 1 x zero",
                                                    router="top_k(k = 2)"))

    def route_to_zero_computation(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("router.weight"):
                    p.zero_()  # scores tie among the FFN experts ...
                    p[4:, 0] = 50.0  # ... and identity / zero win for every token with x[0] > 0

    torch.manual_seed(12)
    x = torch.randn(2, 9, 16)
    x[..., 0] = x[..., 0].abs() + 1.0
    _, out = _check(path, x, perturb=route_to_zero_computation)
    for counts in out.expert_counts:
        assert counts[:4].sum() == 0 and counts[4:].tolist() == [18, 18]


def test_zero_computation_accounting(tmp_path):
    """FFN FLOPs scale with the computed share of the routed pool: k * E / (E + I + Z)."""
    def moe_flops(pool):
        path = _write(tmp_path, ZERO_COMPUTATION.format(pool=pool, router="top_k(k = 2)"), f"{len(pool)}.moe")
        a = compile_model(path).results["analysis"]
        return a["layers"][0]["flops_per_token"]["default"], a["layers"][0]["params"]

    base_flops, base_params = moe_flops("")
    zc_flops, zc_params = moe_flops("experts 2 x identity; experts 2 x zero")
    d, ffn = 16, 3 * 16 * 12
    attention = 2 * 4 * d * d
    assert base_flops - attention - 2 * d * 4 == 2 * 2 * ffn
    assert zc_flops - attention - 2 * d * 8 == 2 * 2 * ffn * 4 / 8
    assert zc_params - base_params == d * 4  # only the router grows


def test_zero_computation_static_form_matches(tmp_path):
    path = _write(tmp_path, ZERO_COMPUTATION.format(pool="experts 2 x identity; experts 1 x zero",
                                                    router="top_k(k = 2)"))
    dynamic, static = moec.load(path).double(), moec.load(path, static=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    a, b = dynamic(x), static(x)
    torch.testing.assert_close(a.output, b.output, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(a.expert_counts, b.expert_counts))


@pytest.mark.parametrize("body,code,text", [
    ("experts 2 x identity; router top_k(k = 1)", "E0211", "no routed experts"),
    ("experts 4 x glu(d, 8); shared 1 x identity; router top_k(k = 1)", "E0220", "routed pool"),
    ("experts 4 x glu(d, 8); experts 1 x zero(3); router top_k(k = 1)", "E0205", "takes no arguments"),
    ("experts 4 x glu(d, 8); experts 1 x zero; experts 2 x zero; router top_k(k = 1)", "E0203", "already"),
    ("experts 2 x glu(d, 8); experts 1 x zero; router top_k(k = 4)", "E0208", ""),
])
def test_zero_computation_misuse(tmp_path, body, code, text):
    src = f"model m {{ const d = 16\n input(dim = d)\n block b {{ moe {{ {body} }} }}\n layers {{ b }} }}"
    diags = check(_write(tmp_path, src))
    assert diags.has_errors
    found = [d for d in diags.items if d.code == code]
    assert found, diags.render()
    assert text in found[0].message


def test_zero_computation_expert_as_a_dense_sublayer_is_an_error(tmp_path):
    diags = check(_write(tmp_path, "model m { input(dim = 8)\n block b { zero }\n layers { b } }"))
    assert [d.code for d in diags.items] == ["E0220"]


POOL = """
model pool {{
  const d = 16
  modality text, image, {third}
  input(dim = d, modalities = [text, image, {third}])
  block b {{
    attention(heads = 2)
    moe {{
      group text  {{ experts 3 x glu(d, 8); router top_k(k = 1) }}
      group image {{ experts 2 x mlp(d, 12); router expert_choice(capacity = 1.0) }}
      experts 4 x glu(d, 10)
      router top_k(k = 2, renormalize = true)
      loss load_balance(0.1)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("static", [False, True])
def test_inter_modality_pool_matches_reference(tmp_path, static):
    """Text and image tokens route in their own group and in the pool; speech has only the pool."""
    path = _write(tmp_path, POOL.format(third="speech"))
    torch.manual_seed(13)
    modality = torch.randint(0, 3, (2, 11))
    model, out = _check(path, torch.randn(2, 11, 16), modality)
    assert [n for n, _ in model.named_parameters() if "shared_pool.router" in n]
    assert out.expert_counts[0].numel() == 3 + 2 + 4
    assert out.expert_counts[0][5:].sum() == 2 * 22  # every token takes 2 pool experts
    if static:  # expert-choice in a masked group has no static form; the pool itself has one
        with pytest.raises(moec.backends.BackendError, match="expert_choice routing inside a modality group"):
            moec.load(path, static=True)
        s = moec.load(_write(tmp_path, POOL.format(third="speech").replace("expert_choice(capacity = 1.0)",
                                                                          "top_k(k = 2)"), "s.moe"))
        static_model = moec.load(str(tmp_path / "s.moe"), static=True)
        x = torch.randn(2, 11, 16)
        torch.testing.assert_close(s(x, modality).output, static_model(x, modality).output)


def test_inter_modality_pool_accounting(tmp_path):
    """A token's active parameters are its own group's plus the pool's."""
    a = compile_model(_write(tmp_path, POOL.format(third="speech"))).results["analysis"]
    moe = a["layers"][0]["active_params_per_token"]
    d, attention, norms = 16, 4 * 16 * 16, 2 * 16
    pool = d * 4 + 2 * 3 * d * 10
    text, image = d * 3 + 3 * d * 8, d * 2 + 1.0 * 2 * d * 12
    assert moe == {"text": attention + norms + text + pool, "image": attention + norms + image + pool,
                   "speech": attention + norms + pool}


def test_inter_modality_pool_name_clash(tmp_path):
    diags = check(_write(tmp_path, POOL.format(third="shared_pool")))
    assert [d.code for d in diags.items] == ["E0203"]
    assert "clashes" in diags.items[0].message


CHAIN = """
model chain {{
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {{
    attention(heads = 2)
    moe {{
      {body}
      iterations = {iterations}
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("body", [
    "experts 6 x glu(d, 12); router top_k(k = 2, renormalize = true); shared 1 x mlp(d, 8)",
    ("group text { experts 4 x glu(d, 8); router top_k(k = 1) }\n"
     "group image { experts 4 x glu(d, 8); experts 1 x identity\n"
     "              router group_limited(k = 2, groups = 5, top_groups = 2) }"),
])
def test_chain_of_experts_matches_reference(tmp_path, body):
    path = _write(tmp_path, CHAIN.format(body=body, iterations=3))
    torch.manual_seed(14)
    modality = torch.randint(0, 2, (2, 8))
    model, out = _check(path, torch.randn(2, 8, 16), modality)
    routers = sorted(n for n, _ in model.named_parameters() if "layers.1" in n and "router" in n)
    assert len(routers) == 3 * (1 if "group" not in body else 2)  # a router per iteration (and group)
    experts = [n for n, _ in model.named_parameters() if "layers.1" in n and "experts" in n]
    assert len(experts) == 3 * (1 if "group" not in body else 2)  # experts once: shared by the iterations
    slots = 2 if "group" not in body else None
    if slots:
        assert int(out.expert_counts[0].sum()) == 3 * 16 * slots  # counts add up over the iterations


def test_chain_of_experts_accounting(tmp_path):
    body = "experts 6 x glu(d, 12); router top_k(k = 2)"
    one = compile_model(_write(tmp_path, CHAIN.format(body=body, iterations=1), "a.moe")).results["analysis"]
    three = compile_model(_write(tmp_path, CHAIN.format(body=body, iterations=3), "b.moe")).results["analysis"]
    attention = 2 * 4 * 16 * 16
    moe_one = one["layers"][0]["flops_per_token"]["text"] - attention
    assert three["layers"][0]["flops_per_token"]["text"] - attention == 3 * moe_one
    assert three["layers"][0]["params"] - one["layers"][0]["params"] == 2 * 16 * 6  # two more routers only


@pytest.mark.parametrize("value,code", [("0", "E0207"), ("1.5", "E0205"), ("100000", "E0206")])
def test_chain_of_experts_misuse(tmp_path, value, code):
    diags = check(_write(tmp_path, CHAIN.format(body="experts 4 x glu(d, 8); router top_k(k = 1)",
                                                iterations=value)))
    assert [d.code for d in diags.items] == [code]


def test_unknown_moe_setting_names_the_settings(tmp_path):
    src = CHAIN.format(body="experts 4 x glu(d, 8); router top_k(k = 1)", iterations=2).replace(
        "iterations", "iteratons")
    diags = check(_write(tmp_path, src))
    assert [d.code for d in diags.items] == ["E0204"]
    assert "iterations" in (diags.items[0].hint or "")


MOT = """
model mot {{
  const d = 16
  modality text, image{extra_modality}
  input(dim = d, modalities = [text, image{extra_modality}])
  block b {{
    per_modality = {flag}
    {residual}
    attention(heads = 2, kv_heads = 1, bias = true)
    glu(d, 24)
    {moe}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


def _mot(tmp_path, flag="true", extra_modality="", residual="", moe="", name="mot.moe"):
    return _write(tmp_path, MOT.format(flag=flag, extra_modality=extra_modality, residual=residual, moe=moe), name)


@pytest.mark.parametrize("variant", [
    {},
    {"extra_modality": ", speech", "residual": "residual = post_norm"},
    {"moe": "moe { experts 4 x mlp(d, 8); router top_k(k = 2) }"},
])
def test_mixture_of_transformers_matches_reference(tmp_path, variant):
    path = _mot(tmp_path, **variant)
    torch.manual_seed(15)
    n_mod = 3 if variant.get("extra_modality") else 2
    modality = torch.randint(0, n_mod, (2, 7))
    modality[1] = 0  # a sequence of one modality: the other copies see no tokens of it
    model, _ = _check(path, torch.randn(2, 7, 16), modality)
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.attention.q_proj.text.weight", "layers.0.attention.o_proj.image.bias",
            "layers.0.ffn.image.up_proj.weight", "layers.1.attention_norm.text.weight"} <= names


def test_mixture_of_transformers_accounting(tmp_path):
    """MoT: FLOPs per token equal to the dense block, parameters x number of modalities."""
    dense = compile_model(_mot(tmp_path, flag="false", extra_modality=", speech", name="a.moe")).results["analysis"]
    mot = compile_model(_mot(tmp_path, extra_modality=", speech", name="b.moe")).results["analysis"]
    for a, b in zip(dense["layers"], mot["layers"]):
        assert a["flops_per_token"] == b["flops_per_token"]
        assert a["active_params_per_token"] == b["active_params_per_token"]
        assert b["params"] == 3 * a["params"]
    generated = sum(p.numel() for n, p in moec.load(_mot(tmp_path, extra_modality=", speech", name="c.moe"))
                    .named_parameters() if n.startswith("layers."))
    assert generated == sum(layer["params"] for layer in mot["layers"])


def test_mixture_of_transformers_static_and_unfused_forms(tmp_path):
    path = _mot(tmp_path, moe="moe { experts 4 x mlp(d, 8); router top_k(k = 2) }")
    x, modality = torch.randn(2, 7, 16), torch.randint(0, 2, (2, 7))
    reference = moec.load(path)(x, modality).output
    for form in ({"static": True}, {"pipeline": "unfused"}):
        torch.testing.assert_close(moec.load(path, **form)(x, modality).output, reference)


@pytest.mark.parametrize("flag,extra,code", [
    ("1", "", "E0205"),
    ("true", "latent_attention(heads = 2, kv_rank = 8, qk_nope_dim = 8, qk_rope_dim = 4, v_dim = 8)", "E0220"),
])
def test_mixture_of_transformers_misuse(tmp_path, flag, extra, code):
    src = MOT.format(flag=flag, extra_modality="", residual=extra, moe="")
    diags = check(_write(tmp_path, src))
    assert code in [d.code for d in diags.items], diags.render()


def test_per_modality_needs_two_modalities(tmp_path):
    src = "model m { input(dim = 8)\n block b { per_modality = true; glu(8, 16) }\n layers { b } }"
    diags = check(_write(tmp_path, src))
    assert [d.code for d in diags.items] == ["E0206"]


SCHEDULED = """
model scheduled {{
  const d = 16
  input(dim = d)
  block b {{
    attention(heads = 2)
    moe {{
      experts 6 x glu(d, 12)
      router top_k(k = 2, temperature = {temperature}{extra})
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("temperature,extra,steps", [
    ("0.5", ", renormalize = true, scale = 2.0", 0),
    ("linear(4.0, 0.5, steps = 10)", "", 0),
    ("linear(4.0, 0.5, steps = 10)", "", 4),
    ("cosine(3.0, 1.0, steps = 8)", ", capacity = 1.0", 5),
    ("cosine(3.0, 1.0, steps = 8)", "", 20),  # past the end: the final value
])
def test_router_temperature_schedules_match_reference(tmp_path, temperature, extra, steps):
    path = _write(tmp_path, SCHEDULED.format(temperature=temperature, extra=extra))

    def advance(model):
        for _ in range(steps):
            model.after_step()

    torch.manual_seed(16)
    model, _ = _check(path, torch.randn(2, 7, 16), perturb=advance, step=steps)
    if "(" in temperature:
        state = model.state_dict()
        saved = [k for k in state if k.endswith("temperature._extra_state")]
        assert len(saved) == 2 and all(state[k] == {"step": steps} for k in saved)
        fresh = moec.load(path).double()
        fresh.load_state_dict(state)  # training resumes at the saved step
        x = torch.randn(2, 7, 16, dtype=torch.float64)
        torch.testing.assert_close(fresh(x).output, model(x).output)


def test_annealed_temperature_sharpens_the_gate(tmp_path):
    """Dense-to-sparse: a high starting temperature spreads the routing weight, the final one concentrates it."""
    path = _write(tmp_path, SCHEDULED.format(temperature="linear(50.0, 0.05, steps = 3)", extra=""))
    model, x = moec.load(path), torch.randn(4, 8, 16)
    spread = []
    for _ in range(4):
        moe = model.layers[0].moe  # the first MoE layer's gate
        with torch.no_grad():
            probs = torch.softmax(moe.router(torch.nn.functional.rms_norm(x, (16,))) / moe.temperature(), -1)
        spread.append(float(probs.max(-1).values.mean()))
        model.after_step()
    assert spread[0] < 0.25 < spread[-1]


@pytest.mark.parametrize("temperature,code", [
    ("linear(4.0, 0.0, steps = 10)", "E0207"),
    ("linear(4.0, 1.0)", "E0205"),
    ("exponential(4.0, 1.0, steps = 3)", "E0205"),
    ("linear(4.0, 1.0, steps = 0)", "E0207"),
])
def test_schedule_misuse(tmp_path, temperature, code):
    diags = check(_write(tmp_path, SCHEDULED.format(temperature=temperature, extra="")))
    assert [d.code for d in diags.items] == [code], diags.render()


def test_temperature_needs_softmax(tmp_path):
    diags = check(_write(tmp_path, SCHEDULED.format(temperature="2.0", extra=", score = sigmoid")))
    assert [d.code for d in diags.items] == ["E0206"]


HEADS = """
model heads {{
  const d = 32
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {{
    {settings}
    attention(heads = 8, kv_heads = {kv}, {routing})
    glu(d, 48)
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("routing,kv,settings", [
    ("routed_heads = 3", 8, ""),
    ("routed_heads = 3, shared_heads = 2", 4, ""),
    ("routed_heads = 6, shared_heads = 2, causal = false", 2, "per_modality = true"),
])
def test_mixture_of_heads_matches_reference(tmp_path, routing, kv, settings):
    path = _write(tmp_path, HEADS.format(routing=routing, kv=kv, settings=settings))
    torch.manual_seed(17)
    model, _ = _check(path, torch.randn(2, 6, 32), torch.randint(0, 2, (2, 6)))
    w = model.layers[0].attention.head_weights(torch.randn(5, 32, dtype=torch.float64))
    k = int(routing.split("=")[1].split(",")[0])
    assert ((w > 0).sum(-1) == k + (2 if "shared" in routing else 0)).all()  # shared heads + top-k heads


def test_mixture_of_heads_accounting(tmp_path):
    """Q and O count the heads a token uses; K and V (computed for every token) count in full."""
    def layer(routing):
        a = compile_model(_write(tmp_path, HEADS.format(routing=routing, kv=4, settings=""), "h.moe"))
        return a.results["analysis"]["layers"][0]
    dense = layer("causal = true")
    moh = layer("routed_heads = 2, shared_heads = 2")
    d, hd = 32, 4
    routers = d * 6 + d * (2 + 2)
    assert moh["params"] - dense["params"] == routers
    qo_saved = 2 * d * hd * (8 - 4)  # 4 of 8 heads active per token: half the Q and O weights
    assert dense["flops_per_token"]["text"] - moh["flops_per_token"]["text"] == 2 * (qo_saved - routers)


@pytest.mark.parametrize("routing,code", [
    ("routed_heads = 7, shared_heads = 2", "E0208"),
    ("shared_heads = 2", "E0211"),
    ("routed_heads = 0", "E0207"),
])
def test_mixture_of_heads_misuse(tmp_path, routing, code):
    diags = check(_write(tmp_path, HEADS.format(routing=routing, kv=8, settings="")))
    assert [d.code for d in diags.items] == [code], diags.render()


def test_mixture_of_heads_static_form_exports(tmp_path):
    """The head choice uses one-hot masks (no scatter), so the static form exports."""
    path = _write(tmp_path, HEADS.format(routing="routed_heads = 3, shared_heads = 2", kv=4, settings=""))
    _assert_static_form_exports(path, d=32)


def _assert_static_form_exports(path, d: int) -> None:
    """The static form of the model at `path` exports, and the exported module gives its outputs."""
    model = moec.load(path, static=True).eval()
    x, modality = torch.randn(1, 6, d), torch.randint(0, 2, (1, 6))
    exported = torch.export.export(model, (x, modality))
    torch.testing.assert_close(exported.module()(x, modality).output, model(x, modality).output)


LORA = """
model lora {{
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {{
    attention(heads = 2)
    moe {{
      {body}
      loss load_balance(0.1)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


def _random_adapters(model):
    """B starts at zero (training starts at the base); make the adapters matter for the check."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("body", [
    "experts 4 x glu(d, 12, lora_rank = 3, lora_alpha = 6); router top_k(k = 2)",
    "experts 4 x glu(d, 12, lora_rank = 4); router top_k(k = 2)",  # 16-byte aligned adapters: grouped GEMMs
    "experts 3 x mlp(d, 10, act = gelu, bias = true, lora_rank = 2); router top_k(k = 1); shared 1 x glu(d, 8)",
    ("group text { experts 3 x glu(d, 8, lora_rank = 2); router top_k(k = 2) }\n"
     "      group image { experts 2 x glu(d, 8); router top_k(k = 1) }"),
    ("group text { experts 3 x glu(d, 8, lora_rank = 4); router top_k(k = 2) }\n"  # same kind: not merged
     "      group image { experts 3 x glu(d, 8, lora_rank = 4); router top_k(k = 1) }"),
    "experts 4 x glu(d, 12, lora_rank = 3, lora_on = [up, gate]); router top_k(k = 2)",
    "experts 3 x mlp(d, 10, bias = true, lora_rank = 2, lora_on = [down]); router top_k(k = 2, renormalize = true)",
])
def test_lora_experts_match_reference(tmp_path, body):
    path = _write(tmp_path, LORA.format(body=body))
    torch.manual_seed(18)
    model, _ = _check(path, torch.randn(2, 7, 16), torch.randint(0, 2, (2, 7)), perturb=_random_adapters)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".base." in n for n in frozen)  # the base FFN is frozen, the adapters train


@pytest.mark.parametrize("expert", ["glu(d, 12, lora_rank = 3)", "glu(d, 12, lora_rank = 3, lora_on = [gate, down])"])
def test_lora_experts_forms_agree(tmp_path, expert):
    path = _write(tmp_path, LORA.format(body=f"experts 4 x {expert}; router top_k(k = 2)"))
    models = [moec.load(path, **form) for form in ({}, {"pipeline": "unfused"}, {"static": True})]
    state = models[0].state_dict()
    for m in models:
        _random_adapters(m)
        m.load_state_dict(models[0].state_dict() if m is not models[0] else state)
    x, modality = torch.randn(2, 7, 16), torch.randint(0, 2, (2, 7))
    for m in models[1:]:
        torch.testing.assert_close(m(x, modality).output, models[0](x, modality).output)


def test_lora_experts_accounting(tmp_path):
    """Parameters: one base FFN + E adapters; active: the base + k adapters; FLOPs: k merged experts."""
    a = compile_model(_write(tmp_path, LORA.format(
        body="experts 4 x glu(d, 12, lora_rank = 3); router top_k(k = 2)"))).results["analysis"]
    d, f, r = 16, 12, 3
    base, adapter = 3 * d * f, 3 * r * (d + f)
    attention, norms, router = 4 * d * d, 2 * d, d * 4
    layer = a["layers"][0]
    assert layer["params"] == attention + norms + router + base + 4 * adapter
    assert layer["active_params_per_token"]["text"] == attention + norms + router + base + 2 * adapter
    assert layer["flops_per_token"]["text"] == 2 * attention + 2 * router + 2 * (2 * base + 2 * adapter)
    down_only = compile_model(_write(tmp_path, LORA.format(
        body="experts 4 x glu(d, 12, lora_rank = 3, lora_on = [down]); router top_k(k = 2)"), "down.moe"))
    layer = down_only.results["analysis"]["layers"][0]
    assert layer["params"] == attention + norms + router + base + 4 * adapter // 3  # one adapted matrix of three
    model = moec.load(_write(tmp_path, LORA.format(
        body="experts 4 x glu(d, 12, lora_rank = 3, lora_on = [down]); router top_k(k = 2)"), "down2.moe"))
    assert sum(p.numel() for p in model.parameters()) == down_only.results["analysis"]["params"]["total"]
    assert not any("up_lora" in n or "gate_lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("body,code", [
    ("experts 2 x glu(d, 8); router top_k(k = 1); shared 1 x glu(d, 8, lora_rank = 2)", "E0220"),
    ("experts 2 x glu(d, 8, lora_alpha = 4); router top_k(k = 1)", "E0211"),
    ("experts 2 x glu(d, 8, lora_rank = 2, weights = ternary); router top_k(k = 1)", "E0206"),
    ("experts 2 x glu(d, 8, lora_on = [up]); router top_k(k = 1)", "E0211"),
    ("experts 2 x mlp(d, 8, lora_rank = 2, lora_on = [gate]); router top_k(k = 1)", "E0206"),
    ("experts 2 x glu(d, 8, lora_rank = 2, lora_on = [up, up]); router top_k(k = 1)", "E0206"),
    ("experts 2 x glu(d, 8, lora_rank = 2, lora_on = []); router top_k(k = 1)", "E0206"),
])
def test_lora_experts_misuse(tmp_path, body, code):
    diags = check(_write(tmp_path, LORA.format(body=body)))
    assert [d.code for d in diags.items] == [code], diags.render()


ATTENTION_EXPERTS = """
model moa {{
  const d = 32
  input(dim = d)
  block b {{
    norm = rms(eps = 1e-5)
    attention(heads = 4, kv_heads = {kv}, experts = 6, top_k = {k}{extra})
    moe {{
      experts 4 x glu(d, 24)
      router top_k(k = 2)
      loss load_balance(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""

RECURRENT = """
model rmoe {{
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block dense {{
    attention(heads = 2)
    glu(d, 24)
  }}
  block b {{
    {settings}
    attention(heads = 2)
    moe {{
      {body}
      recurrent = {recurrent}
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ {layers} }}
}}
"""


@pytest.mark.parametrize("kv,k,extra", [
    (2, 2, ", load_balance = 0.1, z_loss = 0.01"),
    (4, 1, ", causal = false"),
    (1, 6, ", renormalize = true, bias = true, load_balance = 0.05"),
    (2, 3, ", rope_theta = 10000.0, qk_norm = head, bias = true, out_bias = false"),
    (2, 2, ", rope_theta = 500.0, qk_norm = projection, renormalize = true, z_loss = 0.1"),
])
def test_attention_experts_match_reference(tmp_path, kv, k, extra):
    """Forward and backward (float64) against per-token, per-expert textbook attention over the
    shared keys and values; the expert counts come first in each layer's counts."""
    path = _write(tmp_path, ATTENTION_EXPERTS.format(kv=kv, k=k, extra=extra))
    torch.manual_seed(21)
    model, out = _check(path, torch.randn(2, 7, 32))
    for counts in out.expert_counts:
        assert counts.numel() == 6 + 4 and counts[:6].sum() == 2 * 7 * k and counts[6:].sum() == 2 * 7 * 2
    assert model.layers[0].attention_experts.q_proj.shape == (6, 32, 32)
    assert model.layers[0].attention_experts.k_proj.weight.shape == (kv * 8, 32)


def test_attention_experts_skewed_and_tied_routing(tmp_path):
    """Every token to the same two experts (the other experts idle, their weights without
    gradient), and a zero router (all scores tie: the lowest expert ids, gates 1/E)."""
    path = _write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=", load_balance = 0.1"))

    def skew(model):
        with torch.no_grad():
            for layer in model.layers:
                w = layer.attention_experts.router.weight
                w.zero_()
                w[3, :] = 5.0
                w[5, :] = 4.0

    def tie(model):
        with torch.no_grad():
            for layer in model.layers:
                layer.attention_experts.router.weight.zero_()

    torch.manual_seed(22)
    x = torch.randn(2, 6, 32).abs() + 0.5  # positive: x . w ranks expert 3 above 5 above the rest
    model, out = _check(path, x, perturb=skew)
    assert out.expert_counts[0][:6].tolist() == [0, 0, 0, 12, 0, 12]
    experts = model.layers[0].attention_experts
    grads = torch.autograd.grad(model(x.double()).output.sum(), [experts.q_proj, experts.o_proj])
    for g in grads:  # idle experts get no gradient
        assert g[[0, 1, 2, 4]].abs().sum() == 0 and g[[3, 5]].abs().sum() > 0
    _, out = _check(path, torch.randn(2, 6, 32), perturb=tie)
    assert out.expert_counts[0][:6].tolist() == [12, 12, 0, 0, 0, 0]


def test_attention_experts_causal_per_sequence(tmp_path):
    """A token's output depends on earlier tokens of its own sequence only."""
    model = moec.load(_write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=""))).double()
    torch.manual_seed(23)
    x = torch.randn(3, 8, 32, dtype=torch.float64)
    y = model(x).output
    x2 = x.clone()
    x2[1, 5:] = torch.randn(3, 32, dtype=torch.float64)  # change the end of sequence 1 only
    y2 = model(x2).output
    torch.testing.assert_close(y2[1, :5], y[1, :5])
    torch.testing.assert_close(y2[[0, 2]], y[[0, 2]])
    assert not torch.allclose(y2[1, 5:], y[1, 5:])


def test_attention_experts_accounting(tmp_path):
    """Parameters: E x (Q + O) + shared K/V + router; FLOPs per token: k x (Q + O) + K + V + router."""
    path = _write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=""))
    layer = compile_model(path).results["analysis"]["layers"][0]
    d, inner, kv_dim, E, k = 32, 4 * 8, 2 * 8, 6, 2
    q_o, k_v, router = 2 * d * inner, 2 * d * kv_dim, d * E
    moe_params, moe_flops = d * 4 + 4 * 3 * d * 24, 2 * (d * 4 + 2 * 3 * d * 24)
    norms = 2 * d
    assert layer["kind"] == "moe"
    assert layer["params"] == E * q_o + k_v + router + moe_params + norms == 22_912
    assert layer["active_params_per_token"]["default"] == k * q_o + k_v + router + norms + d * 4 + 2 * 3 * d * 24
    assert layer["flops_per_token"]["default"] == 2 * (k * q_o + k_v + router) + moe_flops == 20_096
    biased = compile_model(_write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=", bias = true"), "b.moe"))
    extra = biased.results["analysis"]["layers"][0]["params"] - layer["params"]
    assert extra == E * (inner + d) + 2 * kv_dim  # q and o biases per expert, k and v biases shared


def test_attention_experts_static_form_exports(tmp_path):
    path = _write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=", load_balance = 0.1, z_loss = 0.01"))
    dynamic, static = moec.load(path).double(), moec.load(path, static=True).double()
    torch.manual_seed(24)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    a, b = dynamic(x), static(x)
    torch.testing.assert_close(a.output, b.output)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    assert all(torch.equal(p, q) for p, q in zip(a.expert_counts, b.expert_counts))
    model = static.float().eval()
    exported = torch.export.export(model, (x.float(),))
    torch.testing.assert_close(exported.module()(x.float()).output, model(x.float()).output)


@pytest.mark.parametrize("attention,settings,code,words", [
    ("attention(heads = 4, experts = 4, top_k = 5)", "", "E0208", "top_k = 5 exceeds experts = 4"),
    ("attention(heads = 4, experts = 4)", "", "E0211", "`experts` without `top_k`"),
    ("attention(heads = 4, top_k = 2)", "", "E0211", "`top_k` without `experts`"),
    ("attention(heads = 4, load_balance = 0.1)", "", "E0211", "`load_balance` without `experts`"),
    ("attention(heads = 4, experts = 4, top_k = 0)", "", "E0207", ""),
    ("attention(heads = 4, kv_heads = 3, experts = 4, top_k = 2)", "", "E0210", "multiple of kv_heads"),
    ("attention(heads = 4, experts = 4, top_k = 2, routed_heads = 2)", "", "E0220", "mixture-of-heads"),
    ("attention(heads = 4, experts = 4, top_k = 2)", "per_modality = true", "E0220", "no per-modality form"),
])
def test_attention_experts_misuse(tmp_path, attention, settings, code, words):
    src = HEADS.replace("attention(heads = 8, kv_heads = {kv}, {routing})", attention).replace("{settings}", settings)
    diags = check(_write(tmp_path, src.replace("{{", "{").replace("}}", "}")))
    assert [d.code for d in diags.items] == [code], diags.render()
    assert words in diags.items[0].message


def test_attention_experts_targets(tmp_path):
    """The HLS target names the feature it lacks; the expert-parallel form refuses too."""
    from moec.backends import BackendError
    from moec.backends.hls import emit as hls_emit

    path = _write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=""))
    comp = compile_model(path)
    with pytest.raises(BackendError, match=r"does not support attention experts \(attention\(experts = \.\.\.\)\)"):
        hls_emit(comp, str(tmp_path / "hls"))
    from moec.backends.pytorch.codegen import render

    with pytest.raises(BackendError, match="expert-parallel form has no attention experts"):
        render(comp.graph, "m.moe", plan={"num_devices": 2, "layers": []})


def test_attention_experts_lower_to_mlir(tmp_path):
    pytest.importorskip("torch_mlir")
    from moec.backends import mlir

    path = _write(tmp_path, ATTENTION_EXPERTS.format(kv=2, k=2, extra=", load_balance = 0.1"))
    model = moec.load(path, static=True).eval()
    text = mlir.emit(model, (torch.randn(1, 6, 32),), str(tmp_path / "moa.mlir"))
    assert "func.func" in text and "torch.aten." not in text and "torch.operator" not in text
def _recurrent(tmp_path, body="experts 6 x glu(d, 12); router top_k(k = 2, renormalize = true)",
               recurrent="gru(hidden = 8, projection = 6)", layers="repeat 2 { b dense } b", settings="",
               name="r.moe"):
    return _write(tmp_path, RECURRENT.format(body=body, recurrent=recurrent, layers=layers, settings=settings), name)


@pytest.mark.parametrize("case", [
    {},
    {"body": "experts 6 x mlp(d, 12, bias = true); shared 1 x glu(d, 8); router top_k(k = 3, score = sigmoid)",
     "recurrent": "gru(hidden = 12)", "settings": "residual = post_norm"},
    {"body": ("group text { experts 4 x glu(d, 8); router top_k(k = 1) }\n"  # MoMa-like modality groups
              "group image { experts 3 x glu(d, 8); experts 1 x identity; router top_k(k = 2) }")},
    {"body": ("group text { experts 3 x glu(d, 8); router dynamic_k(threshold = 0.6) }\n"
              "group image { experts 4 x glu(d, 8); router group_limited(k = 2, groups = 2, top_groups = 1) }\n"
              "experts 2 x glu(d, 10); router soft()"), "layers": "b b"},  # with an inter-modality pool
    {"body": "experts 4 x glu(d, 12); router expert_choice(capacity = 1.5)", "settings": "per_modality = true"},
])
def test_recurrent_router_matches_reference(tmp_path, case):
    """h_l = GRU(P_l x_l, h_{l-1}) through the MoE layers (dense layers pass the state on), logits W_l h_l;
    forward and backward against the plain GRU formulas of tests/reference.py."""
    path = _recurrent(tmp_path, **case)
    torch.manual_seed(19)
    model, _ = _check(path, torch.randn(2, 7, 16), torch.randint(0, 2, (2, 7)))
    params = dict(model.named_parameters())
    hidden = 12 if "hidden = 12" in case.get("recurrent", "") else 8
    assert params["router_gru.weight_hh"].shape == (3 * hidden, hidden)  # one cell, at model level
    assert not [n for n in params if "gru" in n and not n.startswith("router_gru.")]
    assert params["layers.0.moe.router_projection.weight"].shape == (hidden if hidden == 12 else 6, 16)
    gates = [p for n, p in params.items() if n.endswith("router.weight")]
    assert gates and all(p.shape[1] == hidden for p in gates)  # the gates read the state


def test_recurrent_router_state_crosses_layers(tmp_path):
    """The state is an IR edge from one MoE layer's router_state to the next one's; gradients of a
    late layer's loss reach the first layer's projection through it."""
    path = _recurrent(tmp_path)
    graph = compile_model(path, pipeline="frontend").graph
    updates = graph.find("router_state")
    assert [graph.op(n).layer for n in updates] == [0, 2, 4]
    assert len(graph.inputs(updates[0])) == 1  # h_0 = 0
    assert [graph.inputs(n)[1].node for n in updates[1:]] == updates[:-1]
    assert all(graph.inputs(n)[3].node == u for u, n in zip(updates, graph.find("moe")))
    text = graph.print()
    assert "router_state(" in text and "recurrent=<cell=gru, hidden=8, projection=6>" in text

    model = moec.load(path)
    out = model(torch.randn(2, 5, 16), torch.randint(0, 2, (2, 5)))
    model.zero_grad()
    out.aux_loss.backward()  # the routers' losses: the last layer's depends on every earlier projection
    assert float(model.layers[0].moe.router_projection.weight.grad.abs().sum()) > 0
    assert float(model.router_gru.weight_hh.grad.abs().sum()) > 0


def test_recurrent_router_forms_agree(tmp_path):
    """Default, unfused and static forms of a MoMa-like recurrent model give the same outputs."""
    path = _recurrent(tmp_path, body=("group text { experts 4 x glu(d, 8); router top_k(k = 2) }\n"
                                      "group image { experts 3 x mlp(d, 8); router top_k(k = 1) }"))
    models = [moec.load(path, **form) for form in ({}, {"pipeline": "unfused"}, {"static": True})]
    x, modality = torch.randn(2, 7, 16), torch.randint(0, 2, (2, 7))
    reference = models[0](x, modality)
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
        out = m(x, modality)
        torch.testing.assert_close(out.output, reference.output)
        torch.testing.assert_close(out.aux_loss, reference.aux_loss)
        assert all(torch.equal(a, b) for a, b in zip(out.expert_counts, reference.expert_counts))


def test_recurrent_router_accounting(tmp_path):
    """Per MoE layer: the projection and the cell's GEMMs; the cell's parameters once; the gates are
    hidden-wide; the generated module holds exactly the counted parameters."""
    body = "experts 6 x glu(d, 12); router top_k(k = 2)"
    plain = compile_model(_write(tmp_path, RECURRENT.format(body=body, recurrent="gru(hidden = 8)", layers="b b",
                                                            settings="").replace("recurrent = gru(hidden = 8)", ""),
                                 "plain.moe")).results["analysis"]
    path = _recurrent(tmp_path, body=body, layers="b b")
    rec = compile_model(path).results["analysis"]
    d, e, hidden, p = 16, 6, 8, 6
    cell = 3 * hidden * (p + hidden) + 6 * hidden
    step = d * p + hidden * e - d * e  # per layer: projection, and a narrower gate
    assert rec["layers"][0]["params"] - plain["layers"][0]["params"] == step + cell
    assert rec["layers"][1]["params"] - plain["layers"][1]["params"] == step
    flops = 2 * (d * p + 3 * hidden * (p + hidden) + hidden * e - d * e)
    for a, b in zip(plain["layers"], rec["layers"]):
        assert b["flops_per_token"]["text"] - a["flops_per_token"]["text"] == flops
        assert b["active_params_per_token"]["image"] - a["active_params_per_token"]["image"] == (
            d * p + 3 * hidden * (p + hidden) + 6 * hidden + hidden * e - d * e)
    assert rec["recurrent_router"] == {"cell": "gru", "hidden": 8, "projection": 6, "cell_params": cell,
                                       "projection_params": 2 * d * p, "layers": 2,
                                       "flops_per_token": 2 * 2 * (d * p + 3 * hidden * (p + hidden))}
    unfused = compile_model(path, pipeline="unfused").results["analysis"]
    assert unfused["params"] == rec["params"] and unfused["flops_per_token"] == rec["flops_per_token"]
    assert sum(x.numel() for x in moec.load(path).parameters()) == rec["params"]["total"]


@pytest.mark.parametrize("case,code,text", [
    ({"body": "experts 2 x glu(d, 8); router deterministic(by = modality)"}, "E0220", "logits"),
    ({"body": ("group text { experts 2 x glu(d, 8); router top_k(k = 1) }\n"
               "group image { experts 2 x glu(d, 8); router deterministic(by = hash) }")}, "E0220", "group `image`"),
    ({"body": "experts 4 x glu(d, 8); router top_k(k = 1); iterations = 2"}, "E0220", "chain of experts"),
    ({"body": "experts 4 x glu(d, 8); router top_k(k = 1, jitter = 0.1)"}, "E0220", "jitter"),
    ({"recurrent": "gru(hidden = 0)"}, "E0207", "hidden"),
    ({"recurrent": "gru(hidden = 8, projection = -2)"}, "E0207", "projection"),
    ({"recurrent": "gru(hidden = 2.5)"}, "E0205", "integer"),
    ({"recurrent": "gru(projection = 4)"}, "E0205", "needs `hidden`"),
    ({"recurrent": "gru(hidden = 8, layers = 2)"}, "E0204", "layers"),
    ({"recurrent": "lstm(hidden = 8)"}, "E0205", "recurrent cell"),
    ({"recurrent": "true"}, "E0205", "recurrent cell"),
])
def test_recurrent_router_misuse(tmp_path, case, code, text):
    diags = check(_recurrent(tmp_path, **case))
    assert [d.code for d in diags.items] == [code], diags.render()
    assert text in diags.items[0].message


def test_recurrent_router_must_be_on_every_moe_layer_with_one_size(tmp_path):
    other = RECURRENT.replace("block dense {{", "block c {{ moe {{ experts 2 x glu(d, 8); router top_k(k = 1)"
                                                "{extra} }} }}\n  block dense {{")
    src = other.format(body="experts 4 x glu(d, 8); router top_k(k = 1)", recurrent="gru(hidden = 8)",
                       layers="b c b", settings="", extra="")
    diags = check(_write(tmp_path, src, "mixed.moe"))
    assert [d.code for d in diags.items] == ["E0220"] and "others do" in diags.items[0].message
    src = other.format(body="experts 4 x glu(d, 8); router top_k(k = 1)", recurrent="gru(hidden = 8)",
                       layers="b c b", settings="", extra="; recurrent = gru(hidden = 8, projection = 4)")
    diags = check(_write(tmp_path, src, "sizes.moe"))
    assert [d.code for d in diags.items] == ["E0210"] and "one GRU cell" in diags.items[0].hint


def test_recurrent_router_hls_target_refuses(tmp_path):
    path = _recurrent(tmp_path, body="experts 4 x glu(d, 8); router top_k(k = 1)", layers="b b")
    from moec.backends import BackendError
    from moec.backends.hls import project_for

    with pytest.raises(BackendError, match="does not support recurrent routers"):
        project_for(compile_model(path))


def test_recurrent_router_static_form_exports(tmp_path):
    """The GRU update has static shapes: the static form of a grouped recurrent model exports."""
    path = _recurrent(tmp_path, body=("group text { experts 4 x glu(d, 8); router top_k(k = 2) }\n"
                                      "group image { experts 3 x mlp(d, 8); router top_k(k = 1) }"))
    _assert_static_form_exports(path, d=16)


MERGED_GROUPS = """
model merged {{
  const d = 16
  modality text, image, audio
  input(dim = d, modalities = [text, image, audio])
  block b {{
    attention(heads = 2)
    moe {{
      {groups}
      loss load_balance(0.1), z_loss(0.01)
    }}
  }}
  layers {{ repeat 2 {{ b }} }}
}}
"""


@pytest.mark.parametrize("groups,merged", [
    (("group text { experts 3 x glu(d, 8); router top_k(k = 2) }\n"
      "group image, audio { experts 4 x glu(d, 8); router top_k(k = 1, renormalize = true) }"), True),
    (("group text { experts 3 x mlp(d, 8, bias = true); router dynamic_k(threshold = 0.6, k_max = 3) }\n"
      "group image { experts 2 x mlp(d, 8, bias = true); router soft() }\n"
      "group audio { experts 2 x mlp(d, 8, bias = true); router top_k(k = 2) }"), True),
    (("group text { experts 3 x glu(d, 8); router top_k(k = 1) }\n"
      "group image, audio { experts 4 x glu(d, 8); router expert_choice(capacity = 1.0) }"), False),
    (("group text { experts 3 x glu(d, 8); router top_k(k = 1) }\n"
      "group image, audio { experts 4 x glu(d, 12); router top_k(k = 1) }"), False),  # different expert shapes
])
def test_modality_groups_in_one_expert_call(tmp_path, groups, merged):
    """Groups that partition the tokens by modality, each routed per token, run as one expert call
    (one host sync per layer) and their routers as one GEMM; the others keep a call per group.
    Both match the reference."""
    path = _write(tmp_path, MERGED_GROUPS.format(groups=groups))
    torch.manual_seed(31)
    for modality in (torch.randint(0, 3, (2, 9)), torch.zeros(2, 9, dtype=torch.long)):  # and only text
        _check(path, torch.randn(2, 9, 16), modality)
    out = tmp_path / "out"
    assert main(["compile", path, "--target", "pytorch", "-o", str(out)]) == 0
    source = (out / "merged.py").read_text()
    assert ("moe_experts_groups(" in source) == merged
    assert source.count("router_logits(") == (1 if merged else 0)  # the groups' routers as one GEMM
    assert ("BBlock: 1 (1 x expert segment sizes)" in source) == merged
