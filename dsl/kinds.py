"""The built-in kinds a `.moe` file can call, with their parameters.

Experts, routers, losses, norms and sublayers are written as calls `kind(args)`; this table is
what the checker binds those calls against. Adding a kind means adding a row here (and a
lowering for it), not changing the grammar.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "int" | "float" | "bool" | "symbol"
    default: object = REQUIRED
    choices: tuple[str, ...] = ()
    positive: bool = False  # sizes and counts: must be > 0
    nonnegative: bool = False


@dataclass(frozen=True)
class Kind:
    name: str
    params: tuple[Param, ...]
    doc: str = ""
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_ACTS = ("silu", "gelu", "gelu_tanh", "relu", "identity")
_WEIGHTS = ("full", "ternary")
# LoRA experts: in a routed pool, `lora_rank = r` makes the experts rank-r adapters (scaled by
# lora_alpha / r) of one frozen base FFN of this shape: W_e = W_0 + (alpha / r) A_e B_e, on the
# projections `lora_on` lists (all of them by default; the others stay the frozen base).
_LORA = (Param("lora_rank", "int", None, positive=True), Param("lora_alpha", "float", None, positive=True),
         Param("lora_on", "list", None))
LORA_PROJECTIONS = ("gate", "up", "down")

EXPERTS = {
    "mlp": Kind("mlp", (Param("dim", "int", positive=True), Param("hidden", "int", positive=True),
                        Param("act", "symbol", "gelu", _ACTS), Param("bias", "bool", False),
                        Param("weights", "symbol", "full", _WEIGHTS), *_LORA),
                "act(x W_up) W_down"),
    "glu": Kind("glu", (Param("dim", "int", positive=True), Param("hidden", "int", positive=True),
                        Param("act", "symbol", "silu", _ACTS), Param("bias", "bool", False),
                        Param("weights", "symbol", "full", _WEIGHTS), *_LORA),
                "(act(x W_gate) * x W_up) W_down; act=silu is SwiGLU, act=gelu is GeGLU; weights = ternary "
                "quantises the matrices to {-1, 0, 1} x a per-expert scale (straight-through gradients)"),
}

# Zero-computation experts: routable like any expert, but no weights and no FLOPs. They sit in a
# routed pool beside one computed expert kind: `experts 8 x ffn; experts 2 x identity`.
ZERO_COMPUTATION = {
    "identity": "returns its input: a routed token skips the FFN (weighted by its routing weight)",
    "zero": "returns zero: a routed token's slot contributes nothing",
}

_SCORES = ("softmax", "sigmoid")
QK_NORMS = ("none", "head", "projection")

# Schedules: values that change with the training step (`model.after_step()` advances them),
# written where a router parameter takes one, e.g. `temperature = linear(2.0, 0.5, steps = 1000)`.
SCHEDULES = {
    "linear": Kind("linear", (Param("start", "float"), Param("end", "float"), Param("steps", "int", positive=True)),
                   "start + (end - start) * min(step / steps, 1)"),
    "cosine": Kind("cosine", (Param("start", "float"), Param("end", "float"), Param("steps", "int", positive=True)),
                   "end + (start - end) * (1 + cos(pi * min(step / steps, 1))) / 2"),
}

ROUTERS = {
    "top_k": Kind("top_k", (Param("k", "int", positive=True),
                            Param("score", "symbol", "softmax", _SCORES),
                            Param("temperature", "schedule", 1.0, positive=True),
                            Param("renormalize", "bool", False),
                            Param("scale", "float", 1.0, positive=True),
                            Param("capacity", "float", None, positive=True),
                            Param("drop", "symbol", "position", ("position", "probability")),
                            Param("jitter", "float", 0.0, nonnegative=True)),
                  "token-choice: each token takes its k highest-scoring experts; with `capacity` (a factor) "
                  "an expert takes at most capacity * T * k / E of them, dropping the rest by `drop`; "
                  "`temperature` divides the logits before the softmax (a number or a schedule such as "
                  "linear(4.0, 1.0, steps = 1000): a dense-to-sparse gate)"),
    "expert_choice": Kind("expert_choice", (Param("capacity", "float", 1.0, positive=True),
                                            Param("group_size", "int", None, positive=True),
                                            Param("score", "symbol", "softmax", _SCORES)),
                          "each expert takes its top capacity * T / E tokens of a routing group (non-causal)"),
    "dynamic_k": Kind("dynamic_k", (Param("threshold", "float"),
                                    Param("k_min", "int", 1, positive=True),
                                    Param("k_max", "int", None, positive=True),
                                    Param("score", "symbol", "softmax", _SCORES)),
                      "the fewest experts whose probabilities sum to `threshold`, between k_min and k_max"),
    "deterministic": Kind("deterministic", (Param("by", "symbol", choices=("modality", "task", "hash")),),
                          "no learned router: expert = modality id, task id, or a hash of the token position"),
    "soft": Kind("soft", (Param("score", "symbol", "softmax", _SCORES),),
                 "dense mixture: every expert, weighted by its probability"),
    "group_limited": Kind("group_limited", (Param("k", "int", positive=True),
                                            Param("groups", "int", positive=True),
                                            Param("top_groups", "int", positive=True),
                                            Param("score", "symbol", "sigmoid", _SCORES),
                                            Param("renormalize", "bool", True),
                                            Param("scale", "float", 1.0, positive=True),
                                            Param("bias_update", "float", 0.001, nonnegative=True)),
                          "DeepSeek-V3: top-k among the best `top_groups` of `groups` expert groups, with a "
                          "selection-only balancing bias updated by `bias_update` after each step"),
}

LOSSES = {
    "load_balance": Kind("load_balance", (Param("coef", "float", nonnegative=True),),
                         "Switch/GShard: E * sum_e f_e * P_e"),
    "z_loss": Kind("z_loss", (Param("coef", "float", nonnegative=True),), "mean(logsumexp(logits)^2)"),
}

NORMS = {
    "rms": Kind("rms", (Param("eps", "float", 1e-6, positive=True),), "RMSNorm"),
    "layer": Kind("layer", (Param("eps", "float", 1e-5, positive=True),), "LayerNorm"),
}

SUBLAYERS = {
    "attention": Kind("attention", (Param("heads", "int", positive=True),
                                    Param("kv_heads", "int", None, positive=True),
                                    Param("head_dim", "int", None, positive=True),
                                    Param("bias", "bool", False),
                                    Param("causal", "bool", True),
                                    Param("rope_theta", "float", None, positive=True),
                                    Param("qk_norm", "symbol", "none", QK_NORMS),
                                    Param("out_bias", "bool", None),
                                    Param("routed_heads", "int", None, positive=True),
                                    Param("shared_heads", "int", 0, nonnegative=True),
                                    Param("experts", "int", None, positive=True),
                                    Param("top_k", "int", None, positive=True),
                                    Param("renormalize", "bool", False),
                                    Param("load_balance", "float", 0.0, nonnegative=True),
                                    Param("z_loss", "float", 0.0, nonnegative=True)),
                      "multi-head (kv_heads = heads) or grouped-query attention; `routed_heads = k` makes heads "
                      "experts (mixture-of-heads): each token weights its top-k of the heads after the first "
                      "`shared_heads` (always on) by a head router; `experts = E, top_k = k` makes attention "
                      "experts (mixture of attention, JetMoE): E query/output projection pairs sharing one key "
                      "and value projection, each token taking its top-k by a softmax router (`renormalize`, "
                      "`load_balance` and `z_loss` coefficients as a moe router's); `rope_theta` adds rotary "
                      "position embeddings (rotate-half), `qk_norm = head | projection` RMS-normalises q and k "
                      "(per head or over the whole projection, with the block norm's eps), `out_bias` overrides "
                      "`bias` for the output projection"),
    "latent_attention": Kind("latent_attention", (Param("heads", "int", positive=True),
                                                  Param("kv_rank", "int", positive=True),
                                                  Param("qk_nope_dim", "int", positive=True),
                                                  Param("qk_rope_dim", "int", positive=True),
                                                  Param("v_dim", "int", positive=True),
                                                  Param("q_rank", "int", None, positive=True),
                                                  Param("rope_theta", "float", 10000.0, positive=True),
                                                  Param("rope_interleave", "bool", False),
                                                  Param("bias", "bool", False),
                                                  Param("eps", "float", 1e-6, positive=True)),
                             "DeepSeek-V2/V3 multi-head latent attention (causal): keys and values from a "
                             "kv_rank-wide latent, queries optionally through a q_rank-wide one; qk_rope_dim "
                             "dims per head carry rotary embeddings (shared by all heads for keys)"),
}

# Mixture-of-Depths: `depth = keep_top(ratio, modalities = [...], weight = ...)` in a block. A scalar
# router scores the block's input tokens; per sequence, the top `ratio` of the candidate tokens
# (those of `modalities`; all when omitted) go through the block, the other candidates skip it
# unchanged, and tokens of other modalities always go through. `ratio` is a number or a per-layer
# schedule over the model's layers.
DEPTH_ROUTERS = {
    "keep_top": Kind("keep_top", (Param("ratio", "layer_schedule", positive=True),
                                  Param("modalities", "list", None),
                                  Param("weight", "symbol", "sigmoid", ("sigmoid", "tanh"))),
                     "per sequence, the ceil(ratio * n) highest-scoring of the n candidate tokens go through the "
                     "block; the block's change to a kept candidate is scaled by weight(score) (sigmoid, or tanh "
                     "as p-MoD's tanh-gated weights); non-causal: a token's choice depends on the others"),
}
# Per-layer schedules: with L layers, layer l (0-based) is at progress p = l / (L - 1).
LAYER_SCHEDULES = {
    "layer_linear": Kind("layer_linear", (Param("start", "float"), Param("end", "float")),
                         "start + (end - start) * p"),
    "layer_cosine": Kind("layer_cosine", (Param("start", "float"), Param("end", "float"),
                                          Param("shift", "float", 0.0, nonnegative=True)),
                         "shifted cosine decay: start for p <= shift, then end + (start - end) * (1 + cos(pi * q)) / 2 "
                         "with q = (p - shift) / (1 - shift)"),
}

# Block-level settings: `name = value` inside a block.
BLOCK_SETTINGS = {
    "depth": "Mixture-of-Depths: keep_top(ratio, modalities = [...], weight = sigmoid | tanh) routes only the top "
             "ratio of each sequence's tokens through the block (ratio may be layer_linear(...) / layer_cosine(...))",
    "norm": "a norm kind: rms(eps = ...) or layer(eps = ...)",
    "residual": "pre_norm (default) or post_norm",
    "per_modality": "true: norms, attention projections and FFNs get a copy per modality; attention stays "
                    "global (Mixture-of-Transformers)",
}
RESIDUALS = ("pre_norm", "post_norm")

# `moe { ... }` settings: `name = value`.
MOE_SETTINGS = {
    "shared_gate": "none (default) or sigmoid: the shared experts' output is scaled by sigmoid(x . w) per token",
    "iterations": "chain-of-experts: route and run the experts this many times, each iteration with its own "
                  "router and a residual between (the experts are shared)",
    "recurrent": "a recurrent router (RMoE): gru(hidden, projection = hidden); the router reads a GRU state "
                 "carried from MoE layer to MoE layer instead of the token",
}
SHARED_GATES = ("none", "sigmoid")

# `recurrent = gru(...)` in a moe: the layer projects its router input x_l to `projection` wide
# (a per-layer matrix), updates a GRU state h_l = GRU(P_l x_l, h_{l-1}) (h_0 = 0, one cell shared
# by every MoE layer) and routes on W_l h_l.
RECURRENT = {
    "gru": Kind("gru", (Param("hidden", "int", positive=True), Param("projection", "int", None, positive=True)),
                "a GRU cell of `hidden` units over a `projection`-wide per-layer projection of the router input"),
}

INPUT = Kind("input", (Param("dim", "int", positive=True), Param("modalities", "list", None)))

# Names of built-in kinds: a user definition may not take one (calls would become ambiguous).
BUILTIN_NAMES = frozenset(EXPERTS) | frozenset(ZERO_COMPUTATION) | frozenset(ROUTERS) | frozenset(LOSSES) | frozenset(SUBLAYERS) | {"moe"}

# `placement { ... }` settings: defaults of `moec place` (the command line overrides them).
PLACEMENT_SETTINGS = {"devices": "expert-parallel devices", "memory": 'expert-weight memory per device, e.g. "80GB"',
                      "redundant": "extra replicas of hot experts per MoE layer"}

# `target NAME { ... }` sections: per-target knobs (read by the backends that take them).
TARGETS = ("pytorch", "mlir", "triton", "hls")

# `target triton { ... }` knobs: tile sizes, each a power of two >= 16 (unset: chosen by shape,
# and autotuned on a GPU).
TRITON_SETTINGS = {
    "block_m": "rows of sorted (token, slot) pairs per expert GEMM tile (each expert pads to a multiple)",
    "block_n": "output columns per expert GEMM tile",
    "block_k": "reduction depth per expert GEMM step",
    "block_t": "tokens per router program",
}

# `target hls { ... }` knobs: precision per tensor kind, parallelism and project settings.
# Precisions are calls `fixed(width, integer, round = ..., overflow = ...)`, i.e. ap_fixed<W, I, Q, O>.
FIXED = Kind("fixed", (Param("width", "int", positive=True), Param("integer", "int"),
                       Param("round", "symbol", "nearest", ("nearest", "truncate", "convergent")),
                       Param("overflow", "symbol", "saturate", ("saturate", "wrap"))),
             "a signed fixed-point type: `width` bits of which `integer` are integer bits (sign included)")
HLS_PRECISIONS = {
    "precision": "the default fixed-point type of every tensor kind",
    "weights": "the fixed-point type of weights, biases and norm gains",
    "activations": "the fixed-point type of activations (inputs, outputs, buffers between layers)",
    "accumulators": "the fixed-point type of multiply-accumulate sums",
}
# name -> (type, minimum, maximum, meaning)
HLS_NUMBERS = {
    "reuse": ("int", 1, 1024, "reuse factor: multiplies each multiplier performs per result (PIPELINE II)"),
    "max_tokens": ("int", 1, 65536, "tokens per call of the generated top function (buffer length)"),
    "max_unroll": ("int", 1, 4096, "the largest unroll factor of any loop (parallel output lanes)"),
    "m_axi_threshold": ("int", 0, 2**40, "expert weight matrices with more entries than this live off chip (m_axi)"),
    "clock": ("float", 0.1, 100.0, "clock period in ns for the Vitis HLS script"),
}
HLS_STRINGS = {"part": 'FPGA part for the Vitis HLS script, e.g. "xcu250-figd2104-2L-e"'}
HLS_SETTINGS = {**HLS_PRECISIONS, **{k: v[3] for k, v in HLS_NUMBERS.items()}, **HLS_STRINGS}
HLS_MAX_WIDTH = 64


# Memory sizes (`placement { memory = "80GB" }`, `moec place --memory`).
_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | float) -> int:
    """'80GB' -> 80*10**9, '512MiB' -> 512*2**20, '1.5G', '4096' (bytes). Raises ValueError on bad input."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        unit = 1
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"invalid memory size {text!r}: expected a number with an optional unit, "
                             "e.g. 80GB, 512MiB, 1.5G or 4096 (bytes; KB/MB/GB/TB are powers of 1000, "
                             "KiB/MiB/GiB/TiB powers of 1024)")
        value, unit = float(m.group(1)), _UNITS[m.group(2).lower()]
    n = int(value * unit)
    if not math.isfinite(value) or n <= 0:
        raise ValueError(f"invalid memory size {text!r}: must be positive")
    return n
