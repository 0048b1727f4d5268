"""Hugging Face transformers MoE models in moec: configs -> `.moe` text, state dicts both ways.

One `ModelTable` per transformers model type says, as data, which config field gives which
property of the decoder stack (`fields`), which properties the model type fixes (`fixed`),
which fields must hold one of a few values moec reproduces exactly (`requires`), which fields do
not affect the decoder stack (`ignored`), and how the checkpoint names its MoE tensors
(`weights`). Any other config field, or a required field with another value, is an error naming
the field (`UnsupportedConfig`): an import never approximates silently.

    text = config_to_moe(config)              # a config.json dict -> .moe source
    state = from_hf(hf_state_dict, config)    # transformers names -> the generated module's names
    hf_state = to_hf(state, config)           # and back (fused 3-D experts or per-expert linears)
    model = load(hf_model)                    # compiled moec module holding hf_model's weights

The generated module computes transformers' decoder stack from ``inputs_embeds`` to
``last_hidden_state`` (final norm included): ``load(hf)(x).output`` equals
``hf.model(inputs_embeds=x).last_hidden_state``. Token embeddings and the LM head are not part
of it (`from_hf` skips them; `SKIPPED`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .moe_text import Call, Decoder, Symbol, write

REQUIRED = object()


class UnsupportedConfig(ValueError):
    """A config moec cannot reproduce exactly; `field` names the config field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config field `{field}`: {message}")
        self.field = field


# ---- typed readers: every config value passes one of these before it is used --------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(key, v):
    if not _is_int(v) or v <= 0:
        raise UnsupportedConfig(key, f"expected a positive integer, got {v!r}")
    return v


def _nonneg_int(key, v):
    if v is None:
        return 0
    if not _is_int(v) or v < 0:
        raise UnsupportedConfig(key, f"expected a non-negative integer, got {v!r}")
    return v


def _opt_pos_int(key, v):
    return None if v is None else _pos_int(key, v)


def _float(key, v, positive: bool):
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise UnsupportedConfig(key, f"expected a {'positive' if positive else 'non-negative'} finite number, "
                                     f"got {v!r}")
    return float(v)


def _bool(key, v):
    if not isinstance(v, bool):
        raise UnsupportedConfig(key, f"expected true or false, got {v!r}")
    return v


def _int_list(key, v):
    if v is None:
        return []
    if not isinstance(v, list) or not all(_is_int(i) and i >= 0 for i in v):
        raise UnsupportedConfig(key, f"expected a list of layer indices, got {v!r}")
    return v


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


def _act(key, v):
    if v not in _ACTIVATIONS:
        raise UnsupportedConfig(key, f"activation {v!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[v]


# property -> (reader, its value for model types whose table does not give it)
SCHEMA: dict[str, tuple[Callable, object]] = {
    "dim": (_pos_int, REQUIRED),
    "num_layers": (_pos_int, REQUIRED),
    "heads": (_pos_int, REQUIRED),
    "kv_heads": (_opt_pos_int, None),
    "head_dim": (_opt_pos_int, None),
    "eps": (lambda k, v: _float(k, v, True), REQUIRED),
    "act": (_act, "silu"),
    "dense_width": (_pos_int, REQUIRED),
    "expert_width": (_pos_int, REQUIRED),
    "num_experts": (_pos_int, REQUIRED),
    "k": (_pos_int, REQUIRED),
    "renormalize": (_bool, False),
    "load_balance": (lambda k, v: _float(k, v, False), 0.0),
    "shared_width": (_opt_pos_int, None),
    "shared_count": (_nonneg_int, 0),
    "attn_bias": (_bool, False),
    "out_bias": (_bool, False),
    "sparse_step": (_pos_int, 1),
    "mlp_only_layers": (_int_list, []),
    "first_dense": (_nonneg_int, 0),
    "groups": (_pos_int, REQUIRED),
    "top_groups": (_pos_int, REQUIRED),
    "scale": (lambda k, v: _float(k, v, True), 1.0),
    "q_rank": (_opt_pos_int, None),
    "kv_rank": (_pos_int, REQUIRED),
    "qk_nope_dim": (_pos_int, REQUIRED),
    "qk_rope_dim": (_pos_int, REQUIRED),
    "v_dim": (_pos_int, REQUIRED),
    "rope_interleave": (_bool, False),
}


@dataclass(frozen=True)
class Weights:
    """Checkpoint names of the MoE tensors under `model.layers.{i}.`: `moe` holds the router
    (`gate`) and fused experts (`experts.gate_up_proj` [E, 2f, d], `experts.down_proj` [E, d, f]);
    `per_expert` is where per-expert linears live (`{per_expert}.experts.{e}.{name}.weight`) with
    the names of the gate, up and down projections; `shared` names the shared expert module."""

    moe: str = "mlp"
    per_expert: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"
    router_bias: str = "e_score_correction_bias"


@dataclass(frozen=True)
class ModelTable:
    model_type: str
    fields: dict[str, str | tuple[str, ...]]  # property -> config field (or aliases, first present wins)
    fixed: dict[str, object]  # properties the model type fixes
    requires: dict[str, tuple] = field(default_factory=dict)  # config field -> the values moec reproduces
    defaults: dict[str, object] = field(default_factory=dict)  # transformers' value of a field a file may omit
    ignored: frozenset[str] = frozenset()  # fields that do not change the decoder stack's numerics
    default_theta: float = 10000.0
    weights: Weights = Weights()


_ATTENTION_FIELDS = {"dim": "hidden_size", "num_layers": "num_hidden_layers", "heads": "num_attention_heads",
                     "kv_heads": "num_key_value_heads", "eps": "rms_norm_eps", "act": "hidden_act"}
_TOP_K_FIELDS = {"k": "num_experts_per_tok", "load_balance": "router_aux_loss_coef"}
_QWEN_DEFAULTS = {"head_dim": None, "hidden_act": "silu", "mlp_only_layers": [], "decoder_sparse_step": 1,
                  "norm_topk_prob": False, "router_aux_loss_coef": 0.001}
_QWEN_LAYOUT = {"sparse_step": "decoder_sparse_step", "mlp_only_layers": "mlp_only_layers",
                "dense_width": "intermediate_size", "expert_width": "moe_intermediate_size"}

TABLES: dict[str, ModelTable] = {t.model_type: t for t in (
    ModelTable(
        "mixtral",
        fields={**_ATTENTION_FIELDS, **_TOP_K_FIELDS, "head_dim": "head_dim", "expert_width": "intermediate_size",
                "num_experts": ("num_local_experts", "num_experts")},
        fixed={"attention": "attention", "router": "top_k", "score": "softmax", "renormalize": True},
        requires={"sliding_window": (None,), "router_jitter_noise": (0,)},
        defaults={"head_dim": None, "num_key_value_heads": 8, "hidden_act": "silu", "router_aux_loss_coef": 0.001},
        default_theta=1e6,
        weights=Weights(per_expert="block_sparse_moe", expert_names=("w1", "w3", "w2"))),
    ModelTable(
        "qwen2_moe",
        fields={**_ATTENTION_FIELDS, **_TOP_K_FIELDS, **_QWEN_LAYOUT, "head_dim": "head_dim",
                "num_experts": ("num_experts", "num_local_experts"), "renormalize": "norm_topk_prob",
                "shared_width": "shared_expert_intermediate_size", "attn_bias": "qkv_bias"},
        fixed={"attention": "attention", "router": "top_k", "score": "softmax", "shared_count": 1,
               "shared_gate": True, "out_bias": False},
        requires={"use_sliding_window": (False,)},
        defaults={**_QWEN_DEFAULTS, "qkv_bias": True},
        ignored=frozenset({"sliding_window", "max_window_layers"})),
    ModelTable(
        "qwen3_moe",
        fields={**_ATTENTION_FIELDS, **_TOP_K_FIELDS, **_QWEN_LAYOUT, "head_dim": "head_dim",
                "num_experts": ("num_experts", "num_local_experts"), "renormalize": "norm_topk_prob",
                "attn_bias": "attention_bias", "out_bias": "attention_bias"},
        fixed={"attention": "attention", "router": "top_k", "score": "softmax", "qk_norm": "head"},
        requires={"use_sliding_window": (False,), "sliding_window": (None,)},
        defaults={**_QWEN_DEFAULTS, "attention_bias": False},
        ignored=frozenset({"max_window_layers"})),
    ModelTable(
        "olmoe",
        fields={**_ATTENTION_FIELDS, **_TOP_K_FIELDS, "expert_width": "intermediate_size",
                "num_experts": ("num_experts", "num_local_experts"), "renormalize": "norm_topk_prob",
                "attn_bias": "attention_bias", "out_bias": "attention_bias"},
        fixed={"attention": "attention", "router": "top_k", "score": "softmax", "qk_norm": "projection"},
        requires={"clip_qkv": (None,)},
        defaults={"hidden_act": "silu", "attention_bias": False, "norm_topk_prob": False,
                  "router_aux_loss_coef": 0.01}),
    ModelTable(
        "deepseek_v3",
        fields={**_ATTENTION_FIELDS, "k": "num_experts_per_tok", "dense_width": "intermediate_size",
                "expert_width": "moe_intermediate_size", "num_experts": ("n_routed_experts", "num_local_experts"),
                "renormalize": "norm_topk_prob", "shared_count": "n_shared_experts",
                "first_dense": "first_k_dense_replace", "groups": "n_group", "top_groups": "topk_group",
                "scale": "routed_scaling_factor", "q_rank": "q_lora_rank", "kv_rank": "kv_lora_rank",
                "qk_nope_dim": "qk_nope_head_dim", "qk_rope_dim": "qk_rope_head_dim", "v_dim": "v_head_dim",
                "rope_interleave": "rope_interleave", "attn_bias": "attention_bias"},
        fixed={"attention": "latent_attention", "router": "group_limited", "score": "sigmoid"},
        requires={"topk_method": ("noaux_tc",), "scoring_func": ("sigmoid",), "moe_layer_freq": (1,)},
        defaults={"hidden_act": "silu", "attention_bias": False, "rope_interleave": True, "norm_topk_prob": True,
                  "n_shared_experts": 1, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5},
        # not read by transformers' forward: training-loss settings of the original code, the
        # multi-token-prediction modules (outside the decoder stack), expert-parallel size, derived sizes
        ignored=frozenset({"aux_loss_alpha", "seq_aux", "num_nextn_predict_layers", "num_mtp_layers", "ep_size",
                           "qk_head_dim", "head_dim"}),
        weights=Weights(shared="shared_experts")),
)}

# Fields of every transformers config that do not change the decoder stack's numerics.
GENERIC_IGNORED = frozenset({
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label", "label2id", "initializer_range",
    "is_encoder_decoder", "max_position_embeddings", "model_type", "output_attentions", "output_hidden_states",
    "output_router_logits", "problem_type", "return_dict", "tie_word_embeddings", "transformers_version",
    "use_cache", "vocab_size", "tokenizer_class"})
GENERIC_REQUIRES = {"attention_dropout": (0,), "pretraining_tp": (1,)}
EVERY_ENTRY = {"layer_types": "full_attention"}  # list fields whose every entry must hold this value
_ROPE_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling")

# transformers state-dict entries outside the decoder stack (not converted)
SKIPPED = ("embed_tokens.weight", "lm_head.weight")


def table_for(config: dict) -> ModelTable:
    model_type = config.get("model_type")
    if model_type not in TABLES:
        raise UnsupportedConfig("model_type", f"model type {model_type!r} is not supported "
                                              f"(supported: {', '.join(TABLES)})")
    return TABLES[model_type]


def _check_fields(config: dict, table: ModelTable) -> None:
    read = {k for v in table.fields.values() for k in ((v,) if isinstance(v, str) else v)}
    requires = {**GENERIC_REQUIRES, **table.requires}
    for key, v in config.items():
        if key in requires:
            if not any(_matches(v, ok) for ok in requires[key]):
                allowed = " or ".join("null" if ok is None else repr(ok) for ok in requires[key])
                raise UnsupportedConfig(key, f"value {v!r} is not supported (moec reproduces {allowed})")
        elif key in EVERY_ENTRY:
            if not isinstance(v, list) or any(x != EVERY_ENTRY[key] for x in v):
                raise UnsupportedConfig(key, f"every entry must be {EVERY_ENTRY[key]!r}, got {v!r}")
        elif key not in read and key not in table.ignored and key not in GENERIC_IGNORED and key not in _ROPE_FIELDS:
            raise UnsupportedConfig(key, f"a `{table.model_type}` config field moec does not know; it may change "
                                         "the model's numerics, so the import stops")


def _matches(v, ok) -> bool:
    if ok is None or isinstance(ok, bool):
        return v is ok
    return not isinstance(v, bool) and v == ok


def _rope_theta(config: dict, table: ModelTable) -> float:
    """Plain rotary embeddings only: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise UnsupportedConfig("rope_parameters", f"expected a mapping, got {params!r}")
    scaling = config.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise UnsupportedConfig("rope_scaling", f"expected a mapping or null, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default"):
            raise UnsupportedConfig("rope_scaling", f"rope scaling {kind!r} is not supported (only plain rotary "
                                                    "embeddings)")
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise UnsupportedConfig("rope_parameters.rope_type", f"rope type {kind!r} is not supported (only "
                                                             "`default`)")
    for key in params:
        if key not in ("rope_type", "rope_theta"):
            raise UnsupportedConfig(f"rope_parameters.{key}", "not supported (plain rotary embeddings only)")
    theta = params.get("rope_theta", config.get("rope_theta", table.default_theta))
    return _float("rope_theta", theta, True)


def _properties(config: dict, table: ModelTable) -> dict:
    """Every property the table gives, read and checked. A field the file omits takes transformers'
    default for this model type (`table.defaults`); moec never guesses one."""
    out = dict(table.fixed)
    for prop, keys in table.fields.items():
        reader = SCHEMA[prop][0]
        keys = (keys,) if isinstance(keys, str) else keys
        key = next((k for k in keys if k in config), None)
        if key is not None:
            out[prop] = reader(key, config[key])
        elif keys[0] in table.defaults:
            out[prop] = reader(keys[0], table.defaults[keys[0]])
        else:
            raise UnsupportedConfig(keys[0], "missing from the config")
    for prop, (_, default) in SCHEMA.items():  # properties this model type does not have
        if default is not REQUIRED:
            out.setdefault(prop, default)
    out["rope_theta"] = _rope_theta(config, table)
    return out


def _layer_kinds(p: dict) -> list[str]:
    """Dense or MoE per layer: the first `first_dense` layers, `mlp_only_layers`, and layers off the
    `sparse_step` grid are dense (one rule covers Mixtral, Qwen-MoE, OLMoE and DeepSeek-V3)."""
    return ["dense" if i < p["first_dense"] or i in p["mlp_only_layers"] or (i + 1) % p["sparse_step"] else "moe"
            for i in range(p["num_layers"])]


def _attention(p: dict, model_type: str) -> Call:
    if p["attention"] == "latent_attention":
        if p["kv_heads"] not in (None, p["heads"]):
            raise UnsupportedConfig("num_key_value_heads", "latent attention has one key/value per head: "
                                                           "expected num_key_value_heads == num_attention_heads")
        args = [("heads", p["heads"]), ("kv_rank", p["kv_rank"]), ("qk_nope_dim", p["qk_nope_dim"]),
                ("qk_rope_dim", p["qk_rope_dim"]), ("v_dim", p["v_dim"])]
        if p["q_rank"] is not None:
            args.append(("q_rank", p["q_rank"]))
        args += [("rope_theta", p["rope_theta"]), ("rope_interleave", p["rope_interleave"]), ("bias", p["attn_bias"])]
        return Call("latent_attention", tuple(args))
    heads, kv = p["heads"], p["kv_heads"] or p["heads"]
    if heads % kv:
        raise UnsupportedConfig("num_key_value_heads", f"{heads} heads do not share {kv} key/value heads evenly")
    head_dim = p["head_dim"] or p["dim"] // heads
    if p.get("qk_norm") == "projection" and head_dim * heads != p["dim"]:
        raise UnsupportedConfig("head_dim", f"`{model_type}` normalises whole projections of hidden_size; "
                                            "heads * head_dim must equal hidden_size")
    args = [("heads", heads), ("kv_heads", kv), ("head_dim", head_dim), ("rope_theta", p["rope_theta"])]
    if p["attn_bias"]:
        args.append(("bias", True))
    if p["out_bias"] != p["attn_bias"]:
        args.append(("out_bias", p["out_bias"]))
    if p.get("qk_norm", "none") != "none":
        args.append(("qk_norm", Symbol(p["qk_norm"])))
    return Call("attention", tuple(args))


def _glu(width: int, act: str) -> Call:
    return Call("glu", (("dim", Symbol("d")), ("hidden", width), ("act", Symbol(act))))


def _router(p: dict) -> Call:
    if p["router"] == "group_limited":
        return Call("group_limited", (("k", p["k"]), ("groups", p["groups"]), ("top_groups", p["top_groups"]),
                                      ("score", Symbol(p["score"])), ("renormalize", p["renormalize"]),
                                      ("scale", p["scale"]), ("bias_update", 0.0)))
    return Call("top_k", (("k", p["k"]), ("score", Symbol(p["score"])), ("renormalize", p["renormalize"])))


def describe(config: dict) -> tuple[ModelTable, dict, Decoder]:
    """The table, the checked properties and the `.moe` description of a transformers config."""
    if not isinstance(config, dict):
        raise UnsupportedConfig("(config)", "expected a JSON object")
    table = table_for(config)
    _check_fields(config, table)
    p = _properties(config, table)
    kinds = _layer_kinds(p)
    shared = None
    if p["shared_count"] and p["shared_width"] is None:  # DeepSeek: n_shared_experts x routed width
        shared = (p["shared_count"], _glu(p["expert_width"], p["act"]))
    elif p["shared_count"] and p["shared_width"]:
        shared = (p["shared_count"], _glu(p["shared_width"], p["act"]))
    notes = [f"rotary embeddings: theta = {p['rope_theta']!r}; RMSNorm eps = {p['eps']!r}."]
    if p["load_balance"]:
        notes.append("load_balance carries router_aux_loss_coef; moec adds one Switch loss per MoE layer, while "
                     "transformers pools all layers' routing into one loss (k assignments per token).")
    if p["router"] == "group_limited":
        notes.append("bias_update = 0: the selection bias (e_score_correction_bias) is loaded, not updated, as in "
                     "transformers; raise it to train with aux-loss-free balancing.")
    dec = Decoder(name=table.model_type, source=table.model_type, dim=p["dim"], eps=p["eps"],
                  attention=_attention(p, table.model_type), layer_kinds=kinds,
                  dense_expert=_glu(p["dense_width"], p["act"]) if "dense" in kinds else None,
                  expert=_glu(p["expert_width"], p["act"]) if "moe" in kinds else None,
                  num_experts=p["num_experts"], router=_router(p), shared=shared,
                  shared_gate=bool(p.get("shared_gate")), load_balance=p["load_balance"], notes=notes)
    p["layer_kinds"] = kinds
    return table, p, dec


def config_to_moe(config: dict) -> str:
    """`.moe` source for a transformers config dict; raises UnsupportedConfig naming a field."""
    return write(describe(config)[2])


# ---- state dicts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """transformers tensors `hf` <-> moec tensors `moec`, converted by TRANSFORMS[kind]."""

    hf: tuple[str, ...]
    moec: tuple[str, ...]
    kind: str = "copy"


def _t(x):
    return x.transpose(-1, -2).contiguous()


def _split_gate_up(ts):
    (gu,) = ts
    f = gu.shape[1] // 2
    return [_t(gu[:, :f]), _t(gu[:, f:])]


def _fuse_gate_up(ts):
    import torch

    gate, up = ts
    return [torch.cat([_t(gate), _t(up)], dim=1)]


def _stack(ts):
    import torch

    return [torch.stack([w.t() for w in ts]).contiguous()]


def _unstack(ts):
    (w,) = ts
    return [e.t().contiguous() for e in w.unbind(0)]


# kind -> (transformers -> moec, moec -> transformers); each maps a list of tensors to a list
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda ts: list(ts), lambda ts: list(ts)),
    "gate_up": (_split_gate_up, _fuse_gate_up),  # [E, 2f, d] <-> gate, up [E, d, f]
    "down": (lambda ts: [_t(ts[0])], lambda ts: [_t(ts[0])]),  # [E, d, f] <-> [E, f, d]
    "stack": (_stack, _unstack),  # E linears [out, in] <-> [E, in, out]
}

_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _attention_rules(p: dict) -> list[tuple[str, str]]:
    if p["attention"] == "latent_attention":
        pairs = [("self_attn.q_proj", "latent_attention.q_proj")] if p["q_rank"] is None else [
            ("self_attn.q_a_proj", "latent_attention.q_a_proj"), ("self_attn.q_b_proj", "latent_attention.q_b_proj")]
        pairs += [("self_attn.kv_a_proj_with_mqa", "latent_attention.kv_a_proj"),
                  ("self_attn.kv_b_proj", "latent_attention.kv_b_proj"), ("self_attn.o_proj", "latent_attention.o_proj")]
        out = [(f"{h}.weight", f"{m}.weight") for h, m in pairs]
        if p["attn_bias"]:
            biased = ["kv_a_proj", "o_proj"] + (["q_a_proj"] if p["q_rank"] is not None else [])
            out += [(f"{h}.bias", f"{m}.bias") for h, m in pairs if m.rsplit(".", 1)[1] in biased]
        norms = [("kv_a_layernorm", "kv_a_norm")] + ([("q_a_layernorm", "q_a_norm")] if p["q_rank"] is not None else [])
        out += [(f"self_attn.{h}.weight", f"latent_attention.{m}.weight") for h, m in norms]
        return [("input_layernorm.weight", "latent_attention_norm.weight"), *out]
    out = [("input_layernorm.weight", "attention_norm.weight")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append((f"self_attn.{proj}.weight", f"attention.{proj}.weight"))
        if p["out_bias"] if proj == "o_proj" else p["attn_bias"]:
            out.append((f"self_attn.{proj}.bias", f"attention.{proj}.bias"))
    if p.get("qk_norm", "none") != "none":
        out += [("self_attn.q_norm.weight", "attention.q_norm.weight"), ("self_attn.k_norm.weight", "attention.k_norm.weight")]
    return out


def rules(table: ModelTable, p: dict, experts: str = "fused") -> list[Rule]:
    """Every tensor of the decoder stack, transformers <-> moec; `experts` is the checkpoint's layout
    of routed experts: "fused" (3-D gate_up_proj / down_proj) or "per_expert" (one linear each)."""
    w = table.weights
    out: list[Rule] = []
    for i, kind in enumerate(p["layer_kinds"]):
        def pair(h: str, m: str, i=i) -> Rule:
            return Rule((f"layers.{i}.{h}",), (f"layers.{i}.{m}",))

        out += [pair(h, m) for h, m in _attention_rules(p)]
        if kind == "dense":
            out.append(pair("post_attention_layernorm.weight", "ffn_norm.weight"))
            out += [pair(f"mlp.{n}.weight", f"ffn.{n}.weight") for n in _LINEARS]
            continue
        hf, m = f"layers.{i}.", f"layers.{i}.moe."
        out.append(pair("post_attention_layernorm.weight", "moe_norm.weight"))
        router = w.moe if experts == "fused" else w.per_expert
        out.append(Rule((f"{hf}{router}.gate.weight",), (f"{m}router.weight",)))
        if p["router"] == "group_limited":
            out.append(Rule((f"{hf}{router}.gate.{w.router_bias}",), (f"{m}router.score_bias",)))
        if experts == "fused":
            out += [Rule((f"{hf}{w.moe}.experts.gate_up_proj",), (f"{m}experts.gate_proj", f"{m}experts.up_proj"),
                         "gate_up"),
                    Rule((f"{hf}{w.moe}.experts.down_proj",), (f"{m}experts.down_proj",), "down")]
        else:
            for name, proj in zip(w.expert_names, _LINEARS):
                out.append(Rule(tuple(f"{hf}{w.per_expert}.experts.{e}.{name}.weight" for e in range(p["num_experts"])),
                                (f"{m}experts.{proj}",), "stack"))
        if p["shared_count"]:
            out += [Rule((f"{hf}{w.moe}.{w.shared}.{n}.weight",), (f"{m}shared.{n}.weight",)) for n in _LINEARS]
            if p.get("shared_gate"):
                out.append(Rule((f"{hf}{w.moe}.{w.shared_gate}.weight",), (f"{m}shared.output_gate.weight",)))
    out.append(Rule(("norm.weight",), ("final_norm.weight",)))
    return out


def _prefix(keys) -> str:
    return "model." if "model.norm.weight" in keys else ""


def _shape(t) -> str:
    return f"[{', '.join(str(n) for n in t.shape)}]"


def _check_shapes(rule: Rule, names: list[str], tensors: list, expected: dict) -> None:
    """Each checkpoint tensor of `rule` against the shape the generated module's tensors give it
    (converted back to transformers' layout); ValueError naming the first that differs."""
    missing = [k for k in rule.moec if k not in expected]
    if missing:  # the rules and the generated module disagree: a moec bug, not the checkpoint's
        raise RuntimeError(f"the generated module has no `{missing[0]}`")
    wanted = TRANSFORMS[rule.kind][1]([expected[k] for k in rule.moec])
    for name, got, want in zip(names, tensors, wanted):
        if tuple(got.shape) != tuple(want.shape):
            moec_names = ", ".join(f"`{k}`" for k in rule.moec)
            raise ValueError(f"tensor `{name}` has shape {_shape(got)}, but the config gives {_shape(want)} "
                             f"(moec {moec_names})")


def _expert_layout(state_dict, p: dict) -> str:
    """How a transformers state dict stores routed experts: "fused" (3-D `experts.gate_up_proj` /
    `experts.down_proj`) or "per_expert" (one linear each)."""
    if "moe" not in p["layer_kinds"] or any(k.endswith("experts.gate_up_proj") for k in state_dict):
        return "fused"
    return "per_expert"


def from_hf(state_dict: dict, config: dict, expected: dict | None = None) -> dict:
    """A transformers state dict (of `XForCausalLM` or the bare `XModel`, fused or per-expert
    experts) as the generated module's state dict. Embeddings and LM head are skipped; any other
    key not consumed, or any missing one, raises KeyError naming it.

    `expected` is the generated module's state dict (e.g. `meta_state_dict(...)`: only shapes are
    read): with it every checkpoint tensor's shape is checked before conversion, and a tensor
    whose shape differs from the one the config gives raises ValueError naming it and both shapes."""
    table, p, _ = describe(config)
    prefix = _prefix(state_dict)
    out, used = {}, set()
    for rule in rules(table, p, _expert_layout(state_dict, p)):
        names = [prefix + k for k in rule.hf]
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise KeyError(f"the transformers state dict has no `{missing[0]}`")
        used.update(names)
        tensors = [state_dict[n] for n in names]
        if expected is not None:
            _check_shapes(rule, names, tensors, expected)
        out.update(zip(rule.moec, TRANSFORMS[rule.kind][0](tensors)))
    extra = sorted(k for k in state_dict if k not in used and not k.endswith(SKIPPED))
    if extra:
        raise KeyError(f"unexpected tensor `{extra[0]}` in the transformers state dict"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if expected is not None and set(out) != set(expected):  # a moec bug: rules and module disagree
        unconverted = sorted(set(expected) - set(out)) or sorted(set(out) - set(expected))
        raise RuntimeError(f"converted state dict and generated module differ at `{unconverted[0]}`")
    return out


def to_hf(state_dict: dict, config: dict, experts: str = "fused", prefix: str = "model.") -> dict:
    """The generated module's state dict under transformers names (`prefix` + decoder keys);
    `experts="per_expert"` writes one linear per expert instead of fused 3-D tensors."""
    if experts not in ("fused", "per_expert"):
        raise ValueError(f"experts must be 'fused' or 'per_expert', got {experts!r}")
    table, p, _ = describe(config)
    out, used = {}, set()
    for rule in rules(table, p, experts):
        missing = [k for k in rule.moec if k not in state_dict]
        if missing:
            raise KeyError(f"the moec state dict has no `{missing[0]}`")
        used.update(rule.moec)
        out.update(zip((prefix + k for k in rule.hf), TRANSFORMS[rule.kind][1]([state_dict[k] for k in rule.moec])))
    extra = sorted(set(state_dict) - used)
    if extra:
        raise KeyError(f"unexpected tensor `{extra[0]}` in the moec state dict")
    return out


# ---- loading a transformers model --------------------------------------------------------------------
def config_dict(hf_config) -> dict:
    """A transformers config object (or a dict) as the plain dict `config.json` would hold."""
    return hf_config if isinstance(hf_config, dict) else hf_config.to_dict()


def write_moe(config: dict, directory: str) -> str:
    """Write the `.moe` file of `config` into `directory` (named by content hash); return its path."""
    text = config_to_moe(config)
    path = os.path.join(directory, f"{re.sub(r'[^a-z0-9_]', '_', table_for(config).model_type)}_"
                                   f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.moe")
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return path


def load(hf_model, seed: int = 0, pipeline: str = "default"):
    """The moec-generated module for `hf_model` (a transformers MoE model: `XForCausalLM` or
    `XModel`) holding its weights in fp32: `load(hf)(x).output` equals
    `hf.model(inputs_embeds=x).last_hidden_state` for hidden states `x` [B, S, d]."""
    import moec
    from moec.api import cache_dir

    config = config_dict(hf_model.config)
    model = moec.load(write_moe(config, os.path.join(cache_dir(), "imported")), seed=seed, pipeline=pipeline)
    model.load_state_dict(from_hf(hf_model.state_dict(), config, expected=model.state_dict()), strict=True)
    return model.train(hf_model.training)


def meta_state_dict(text: str, source: str = "<imported>.moe") -> dict:
    """The state dict of the module generated from `.moe` `text`, built on the meta device: every
    tensor's name and shape, without memory or weights (what `from_hf(..., expected=)` checks a
    checkpoint against). `source` names the text in diagnostics. Raises moec.CompileError on bad text."""
    import torch
    from moec.api import import_generated
    from moec.backends.pytorch import render
    from moec.driver import compile_model

    comp = compile_model(source, text=text)
    module = import_generated(comp.graph.name, render(comp.graph, source))
    with torch.device("meta"):
        return module.Model(seed=0).state_dict()
