"""The built-in kinds a `.moe` file can call, with their parameters.

Experts, routers, losses, norms and sublayers are written as calls `kind(args)`; this table is
what the checker binds those calls against. Adding a kind means adding a row here (and a
lowering for it), not changing the grammar.
"""

from __future__ import annotations

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

EXPERTS = {
    "mlp": Kind("mlp", (Param("dim", "int", positive=True), Param("hidden", "int", positive=True),
                        Param("act", "symbol", "gelu", _ACTS), Param("bias", "bool", False)),
                "act(x W_up) W_down"),
    "glu": Kind("glu", (Param("dim", "int", positive=True), Param("hidden", "int", positive=True),
                        Param("act", "symbol", "silu", _ACTS), Param("bias", "bool", False)),
                "(act(x W_gate) * x W_up) W_down; act=silu is SwiGLU, act=gelu is GeGLU"),
}

ROUTERS = {
    "top_k": Kind("top_k", (Param("k", "int", positive=True),
                            Param("score", "symbol", "softmax", ("softmax", "sigmoid")),
                            Param("renormalize", "bool", False),
                            Param("scale", "float", 1.0, positive=True)),
                  "token-choice: each token takes its k highest-scoring experts"),
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
                                    Param("causal", "bool", True)),
                      "multi-head (kv_heads = heads) or grouped-query attention"),
}

# Block-level settings: `name = value` inside a block.
BLOCK_SETTINGS = {
    "norm": "a norm kind: rms(eps = ...) or layer(eps = ...)",
    "residual": "pre_norm (default) or post_norm",
}
RESIDUALS = ("pre_norm", "post_norm")

INPUT = Kind("input", (Param("dim", "int", positive=True), Param("modalities", "list", None)))

# Names of built-in kinds: a user definition may not take one (calls would become ambiguous).
BUILTIN_NAMES = frozenset(EXPERTS) | frozenset(ROUTERS) | frozenset(LOSSES) | frozenset(SUBLAYERS) | {"moe"}
