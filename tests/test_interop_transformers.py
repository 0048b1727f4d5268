"""transformers interop: tiny random transformers models (built from config objects, no downloads)
converted to moec must compute the same decoder stack, route to the same experts, give the same
gradients, and map their weights both ways without missing or unexpected keys.

Tolerance (fp32): hidden states within 1e-5 absolute (observed <= 2e-6 on outputs of magnitude ~4);
gradients (input and weights) within 1e-5 of their largest entry, at least 1e-5 absolute
(observed <= 2e-6 of it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

T = pytest.importorskip("transformers")
H = pytest.importorskip("moec.interop.transformers")

ATOL = 1e-5
D = 64

CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(
        hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=64, rms_norm_eps=1e-5),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        hidden_size=D, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        vocab_size=64, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(
        hidden_size=D, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, vocab_size=64, norm_topk_prob=True),
    "olmoe": lambda: T.OlmoeConfig(
        hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, vocab_size=64, eos_token_id=1, pad_token_id=0),
    "deepseek_v3": lambda: T.DeepseekV3Config(
        hidden_size=D, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_shared_experts=2, routed_scaling_factor=2.5, vocab_size=64),
}
MODEL_TYPES = list(CONFIGS)


def hf_model(name: str, seed: int = 0):
    """A random transformers model; weights large enough that routing and norms are far from uniform."""
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module", params=MODEL_TYPES)
def pair(request):
    hf = hf_model(request.param)
    return request.param, hf, H.load(hf)


def _hf_routing(hf):
    """Forward hooks recording each MoE layer's chosen experts ([T, k], as sorted sets per token)."""
    chosen, handles = [], []
    for layer in hf.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(layer.mlp, "experts"):
            continue
        handles.append(gate.register_forward_hook(lambda m, i, out: chosen.append(out[2].sort(-1).values)))
    return chosen, handles


def _moec_routing(model, monkeypatch):
    """Record the expert ids the generated module's routers return."""
    module = sys.modules[type(model).__module__]
    chosen = []
    for fn in ("route_top_k", "route_group_limited"):
        if hasattr(module, fn):
            original = getattr(module, fn)

            def wrapped(*a, _original=original, **kw):
                w, ids, probs = _original(*a, **kw)
                chosen.append(ids.sort(-1).values)
                return w, ids, probs

            monkeypatch.setattr(module, fn, wrapped)
    return chosen


def test_decoder_output_and_routing_match(pair, monkeypatch):
    name, hf, model = pair
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    hf_chosen, handles = _hf_routing(hf)
    hf_layers = []
    handles += [layer.register_forward_hook(lambda m, i, out: hf_layers.append(out[0] if isinstance(out, tuple) else out))
                for layer in hf.model.layers]
    moec_layers = []
    handles += [layer.register_forward_hook(lambda m, i, out: moec_layers.append(out[0])) for layer in model.layers]
    # the MoE block alone: transformers' `mlp` output; moec's is the layer output minus its input to moe_norm
    hf_moe, moec_moe_in = [], []
    handles += [layer.mlp.register_forward_hook(lambda m, i, out: hf_moe.append(out))
                for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    handles += [layer.moe_norm.register_forward_pre_hook(lambda m, i: moec_moe_in.append(i[0]))
                for layer in model.layers if hasattr(layer, "moe_norm")]
    moec_chosen = _moec_routing(model, monkeypatch)
    try:
        with torch.no_grad():
            ref = hf.model(inputs_embeds=x).last_hidden_state
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    err = (out.output - ref).abs().max().item()
    assert err < ATOL, f"{name}: decoder output differs by {err}"
    assert len(hf_layers) == len(moec_layers) == hf.config.num_hidden_layers
    for i, (a, b) in enumerate(zip(hf_layers, moec_layers)):  # every decoder layer (attention + MoE/MLP block)
        assert (a - b).abs().max().item() < ATOL, f"{name}: layer {i} output differs"
    moe_layers = [i for i, layer in enumerate(model.layers) if hasattr(layer, "moe_norm")]
    assert len(hf_moe) == len(moec_moe_in) == len(moe_layers) > 0
    for y_hf, x_in, i in zip(hf_moe, moec_moe_in, moe_layers):
        y = moec_layers[i] - x_in
        assert (y - y_hf).abs().max().item() < ATOL, f"{name}: MoE block of layer {i} differs"
    assert len(hf_chosen) == len(moec_chosen) == len(out.expert_counts) > 0
    for a, b in zip(hf_chosen, moec_chosen):  # the same experts for every token
        assert torch.equal(a, b)
    for counts, ids in zip(out.expert_counts, hf_chosen):
        assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=counts.numel()))


def test_gradients_match(pair):
    name, hf, model = pair
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3))
    x_hf, x_m = x.clone().requires_grad_(), x.clone().requires_grad_()
    hf.zero_grad()
    model.zero_grad()
    (hf.model(inputs_embeds=x_hf).last_hidden_state * g).sum().backward()
    (model(x_m).output * g).sum().backward()
    _close_grad(name, "inputs_embeds", x_m.grad, x_hf.grad)
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
    grads.update({k: torch.zeros_like(b) for k, b in model.named_buffers() if k in model.state_dict()})
    as_hf = H.to_hf(grads, H.config_dict(hf.config))
    hf_params = dict(hf.named_parameters())
    for key, grad in as_hf.items():
        if key in hf_params:  # buffers (DeepSeek's selection bias) have no gradient
            ref = hf_params[key].grad if hf_params[key].grad is not None else torch.zeros_like(grad)
            _close_grad(name, key, grad, ref)


def _close_grad(name: str, key: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Gradients sum over tokens and layers: compare within ATOL of their largest entry (>= ATOL absolute)."""
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= ATOL * max(1.0, scale), f"{name} {key}: gradient differs by {err} (largest entry {scale})"


@pytest.mark.parametrize("experts", ["fused", "per_expert"])
def test_state_dict_round_trip(pair, experts):
    _, hf, model = pair
    config = H.config_dict(hf.config)
    sd = hf.state_dict()
    back = H.to_hf(model.state_dict(), config, experts=experts)
    if experts == "fused":
        assert set(back) == set(sd) - {"model.embed_tokens.weight", "lm_head.weight"}
        for k, v in back.items():
            assert torch.equal(v, sd[k]), k
        fresh = T.AutoModelForCausalLM.from_config(hf.config)
        missing, unexpected = fresh.load_state_dict(back, strict=False)
        assert unexpected == [] and sorted(missing) == ["lm_head.weight", "model.embed_tokens.weight"]
    again = H.from_hf(back, config)  # per-expert linears read back as well
    assert set(again) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(again[k], v), k


def test_from_hf_reports_missing_and_unexpected_keys():
    hf = hf_model("mixtral")
    config = H.config_dict(hf.config)
    sd = dict(hf.state_dict())
    del sd["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.self_attn.q_proj.weight"):
        H.from_hf(sd, config)
    sd = dict(hf.state_dict(), **{"model.layers.0.mlp.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="model.layers.0.mlp.extra.weight"):
        H.from_hf(sd, config)


# ---- the command line ---------------------------------------------------------------------------------
def _moec(*args):
    return subprocess.run([sys.executable, "-m", "moec.cli", *args], check=False, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_import_command_with_saved_checkpoint(tmp_path, name):
    """config.json + save_pretrained() safetensors (per-expert names on disk) -> .moe + state -> same numerics."""
    import moec

    hf = hf_model(name, seed=4)
    hf.save_pretrained(tmp_path / "ckpt")
    r = _moec("import", "hf", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.moe"),
              "--weights", str(tmp_path / "ckpt"), "--state", str(tmp_path / "m.pt"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "m.moe").read_text()
    assert text.startswith(f"# Imported by `moec import hf` from a transformers `{name}` config.")
    model = moec.load(str(tmp_path / "m.moe"))
    model.load_state_dict(torch.load(tmp_path / "m.pt"), strict=True)
    x = torch.randn(1, 5, D)
    with torch.no_grad():
        err = (model(x).output - hf.model(inputs_embeds=x).last_hidden_state).abs().max().item()
    assert err < ATOL


def _config_file(tmp_path, name: str, **changes) -> str:
    config = {**H.config_dict(CONFIGS[name]()), **changes}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("name, changes, field", [
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("mixtral", {"model_type": "llama"}, "model_type"),
    ("mixtral", {"some_new_switch": True}, "some_new_switch"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("deepseek_v3", {"rope_scaling": {"type": "yarn", "factor": 40}}, "rope_scaling"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters.rope_type"),
    ("mixtral", {"hidden_act": "silu)\nimport os"}, "hidden_act"),  # config text never reaches generated code
    ("mixtral", {"hidden_size": "64; x"}, "hidden_size"),
    ("mixtral", {"rms_norm_eps": float("inf")}, "rms_norm_eps"),
])
def test_unsupported_config_fields_are_named(tmp_path, capsys, name, changes, field):
    from moec.cli import main

    path = _config_file(tmp_path, name, **changes)
    with pytest.raises(H.UnsupportedConfig) as info:
        H.config_to_moe(json.loads((tmp_path / "config.json").read_text()))
    assert info.value.field == field
    assert main(["import", "hf", path, "-o", str(tmp_path / "m.moe")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moec: error: config field ") and f"`{field}`" in err, err
    assert not (tmp_path / "m.moe").exists()


def test_imported_text_is_readable_and_checks(tmp_path):
    from moec.driver import frontend

    for name in MODEL_TYPES:
        text = H.config_to_moe(H.config_dict(CONFIGS[name]()))
        spec = frontend(str(tmp_path / f"{name}.moe"), text)
        assert len(spec.layers) == CONFIGS[name]().num_hidden_layers
    qwen2 = H.config_to_moe(H.config_dict(CONFIGS["qwen2_moe"]()))
    assert "layers { moe_layer; dense_layer; moe_layer }" in qwen2
    assert "shared_gate = sigmoid" in qwen2 and "out_bias = false" in qwen2
    deepseek = H.config_to_moe(H.config_dict(CONFIGS["deepseek_v3"]()))
    assert "layers { dense_layer; repeat 2 { moe_layer } }" in deepseek
    assert "group_limited(k = 4, groups = 4, top_groups = 2, score = sigmoid, renormalize = true, scale = 2.5" in deepseek


def test_hub_style_configs_import():
    """config.json files as published (transformers 4 layout: top-level rope_theta, rope_scaling null,
    fields of the original code) import without a transformers installation in the loop."""
    mixtral = {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
               "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
               "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
               "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
               "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
               "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000}
    text = H.config_to_moe(mixtral)
    assert "attention(heads = 32, kv_heads = 8, head_dim = 128, rope_theta = 1000000.0)" in text
    assert "layers { repeat 32 { moe_layer } }" in text
    deepseek = {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "aux_loss_alpha": 0.001, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
                "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
                "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
                "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
                "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
                "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "routed_scaling_factor": 2.5,
                "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4,
                "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128,
                "vocab_size": 129280}
    text = H.config_to_moe(deepseek)
    assert "layers { repeat 3 { dense_layer }; repeat 58 { moe_layer } }" in text
    assert "group_limited(k = 8, groups = 8, top_groups = 4" in text
    with pytest.raises(H.UnsupportedConfig, match="topk_method"):
        H.config_to_moe({**deepseek, "topk_method": "greedy"})
    with pytest.raises(H.UnsupportedConfig, match="quantization_config"):
        H.config_to_moe({**deepseek, "quantization_config": {"quant_method": "fp8"}})


def test_omitted_fields_take_transformers_defaults_or_stop():
    qwen2 = H.config_dict(CONFIGS["qwen2_moe"]())
    del qwen2["qkv_bias"]  # transformers' Qwen2-MoE default: q/k/v biases
    assert "bias = true, out_bias = false" in H.config_to_moe(qwen2)
    mixtral = H.config_dict(CONFIGS["mixtral"]())
    del mixtral["hidden_size"]
    with pytest.raises(H.UnsupportedConfig, match="hidden_size") as info:
        H.config_to_moe(mixtral)
    assert info.value.field == "hidden_size"


def test_load_bare_decoder_model():
    """`XModel` (no LM head, keys without the `model.` prefix) loads as well, and maps back."""
    hf = hf_model("qwen2_moe", seed=5)
    model = H.load(hf.model)
    x = torch.randn(1, 6, D)
    with torch.no_grad():
        assert (model(x).output - hf.model(inputs_embeds=x).last_hidden_state).abs().max().item() < ATOL
    back = H.to_hf(model.state_dict(), H.config_dict(hf.config), prefix="")
    assert set(back) == set(hf.model.state_dict()) - {"embed_tokens.weight"}


# ---- checkpoints that disagree with the config, and output files ------------------------------------
@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    """A saved tiny Mixtral (config.json + model.safetensors, per-expert linears on disk)."""
    path = tmp_path_factory.mktemp("ckpt") / "mixtral"
    hf_model("mixtral", seed=6).save_pretrained(path)
    return path


def _import(capsys, *args) -> tuple[int, str]:
    from moec.cli import main

    code = main(["import", "hf", *map(str, args)])
    return code, capsys.readouterr().err


def _listing(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_from_hf_checks_shapes_against_the_generated_module(layout):
    """A state dict whose experts are narrower than the config says: ValueError naming the
    checkpoint tensor, its shape and the config's, whichever layout the experts are stored in."""
    hf = hf_model("mixtral")
    config = H.config_dict(hf.config)
    wider = {**config, "intermediate_size": 128}
    expected = H.meta_state_dict(H.config_to_moe(wider))
    assert all(t.is_meta for t in expected.values())
    assert H.from_hf(hf.state_dict(), config, expected=H.meta_state_dict(H.config_to_moe(config))).keys() == \
        expected.keys()
    moec_state = H.from_hf(hf.state_dict(), config)
    sd = H.to_hf(moec_state, config, experts=layout)
    name = ("model.layers.0.mlp.experts.gate_up_proj [8, 192, 64]" if layout == "fused" else
            "model.layers.0.block_sparse_moe.experts.0.w1.weight [96, 64]")
    want = "[8, 256, 64]" if layout == "fused" else "[128, 64]"
    with pytest.raises(ValueError) as info:
        H.from_hf(sd, wider, expected=expected)
    tensor, shape = name.split(" ", 1)
    assert f"tensor `{tensor}` has shape {shape}, but the config gives {want}" in str(info.value)


def test_import_command_rejects_weights_that_disagree_with_the_config(tmp_path, capsys, mixtral_ckpt):
    config = _config_file(tmp_path, "mixtral", intermediate_size=80)
    out = tmp_path / "out"
    code, err = _import(capsys, config, "-o", out / "m.moe", "--weights", mixtral_ckpt, "--state", out / "m.pt")
    assert code == 1, err
    assert err.startswith("moec: error: tensor `model.layers.0.block_sparse_moe.experts.0.w1.weight` has shape "
                          "[96, 64], but the config gives [80, 64]"), err
    assert not out.exists()


def test_import_command_file_errors_write_nothing(tmp_path, capsys, mixtral_ckpt, monkeypatch):
    """Unreadable weights and unwritable outputs: `moec: error:` naming the user's path (never a
    temporary file), exit 1, and nothing written, not even the output whose path was fine."""
    ckpt = str(mixtral_ckpt)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [  # (arguments after the config, text the error must hold)
        (["-o", "m.moe", "--weights", f"{ckpt}/config.json", "--state", "m.pt"],
         f"--weights `{ckpt}/config.json` is not a safetensors file"),
        (["-o", "m.moe", "--weights", ckpt, "--state", "adir"], "--state `adir` is a directory"),
        (["-o", "adir", "--weights", ckpt, "--state", "m.pt"], "-o `adir` is a directory"),
        (["-o", "m.moe", "--weights", ckpt, "--state", "afile/m.pt"], "is not a directory"),
        (["-o", "afile/sub/m.moe"], "is not a directory"),
        (["-o", "m.pt", "--weights", ckpt, "--state", "m.pt"], "name the same file `m.pt`"),
        (["-o", "m.moe", "--state", "m.pt"], "--state needs --weights"),
    ]
    before = _listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    for args, message in cases:
        code, err = _import(capsys, ckpt, *args)
        assert code == 1 and err.startswith("moec: error: ") and message in err, (args, err)
        assert "internal error" not in err and ".tmp" not in err, err
        assert _listing(tmp_path) == before, args  # no output, no temporary file


def test_import_command_writes_both_outputs_or_neither(tmp_path, capsys, mixtral_ckpt, monkeypatch):
    """A failure while writing the state dict leaves neither file, no temporary file and no
    directory made for them; the error names the user's path. Without failure both are written."""
    def full_disk(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    out = tmp_path / "new" / "dir"
    args = [mixtral_ckpt, "-o", out / "m.moe", "--weights", mixtral_ckpt, "--state", out / "state" / "m.pt"]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        code, err = _import(capsys, *args)
    assert code == 1 and err.startswith(f"moec: error: cannot write `{out / 'state' / 'm.pt'}`: "), err
    assert "No space left on device" in err and ".tmp" not in err, err
    assert _listing(tmp_path) == []
    code, err = _import(capsys, *args)
    assert code == 0, err
    assert _listing(tmp_path) == ["new", "new/dir", "new/dir/m.moe", "new/dir/state", "new/dir/state/m.pt"]
    assert set(torch.load(out / "state" / "m.pt")) == set(H.meta_state_dict((out / "m.moe").read_text()))
