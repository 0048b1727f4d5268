"""IR op attributes: one frozen pydantic model per op kind, discriminated on `kind`.

Specs shared by several ops (an expert's shape, a router's semantics, loss coefficients) are
small models of their own. Every op keeps the SourceLoc of the `.moe` text it came from.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from moec.diagnostics import SourceLoc
from pydantic import BaseModel, ConfigDict, Field

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(Spec):
    """One feed-forward expert: `mlp` is act(x W_up) W_down, `glu` is (act(x W_gate) * x W_up) W_down."""

    always_shown: ClassVar[tuple[str, ...]] = ("form", "dim", "hidden", "act", "bias")
    form: Literal["mlp", "glu"]
    dim: int
    hidden: int
    act: Literal["silu", "gelu", "gelu_tanh", "relu", "identity"]
    bias: bool = False
    weights: Literal["full", "ternary"] = "full"  # ternary: {-1, 0, 1} x a per-expert absmean scale
    lora_rank: int | None = None  # routed LoRA experts: rank-r adapters of one frozen base FFN
    lora_alpha: float | None = None  # adapter scale alpha / r (alpha defaults to r)
    lora_on: tuple[Literal["gate", "up", "down"], ...] | None = None  # adapted projections; None: all

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.form == "glu" else ("up", "down")

    def adapted(self, projection: str) -> bool:
        """Whether a LoRA expert carries an adapter on this projection."""
        return self.lora_rank is not None and (self.lora_on is None or projection in self.lora_on)

    @property
    def adapter_params(self) -> int:
        """Trainable parameters of one LoRA expert: A [in, r] and B [r, out] per adapted matrix."""
        adapted = sum(self.adapted(p) for p in self.projections)
        return adapted * (self.lora_rank or 0) * (self.dim + self.hidden)

    @property
    def params(self) -> int:
        mats = 3 if self.form == "glu" else 2
        biases = (self.hidden * (mats - 1) + self.dim) if self.bias else 0
        return mats * self.dim * self.hidden + biases

    def widened(self, count: int) -> ExpertSpec:
        """`count` always-on copies summed: one expert `count` times as wide (one output bias)."""
        return self.model_copy(update={"hidden": self.hidden * count})

    @property
    def flops(self) -> int:
        """Forward FLOPs for one token (2 per multiply-accumulate)."""
        mats = 3 if self.form == "glu" else 2
        return 2 * mats * self.dim * self.hidden


class ScheduleSpec(Spec):
    """A value over training steps: `linear` or half-`cosine` from start (step 0) to end (step
    `steps`), constant after."""

    always_shown: ClassVar[tuple[str, ...]] = ("kind", "start", "end", "steps")
    kind: Literal["linear", "cosine"]
    start: float
    end: float
    steps: int

    def values(self) -> tuple[float, float]:
        return self.start, self.end


class LayerScheduleSpec(Spec):
    """A value over the layers of a model: at layer l of L, progress p = l / (L - 1) (0 when L = 1);
    `linear` goes from start to end; `cosine` stays at start until p = shift, then follows a
    half cosine to end."""

    always_shown: ClassVar[tuple[str, ...]] = ("kind", "start", "end")
    kind: Literal["linear", "cosine"]
    start: float
    end: float
    shift: float = 0.0

    def at(self, layer: int, num_layers: int) -> float:
        p = layer / (num_layers - 1) if num_layers > 1 else 0.0
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        q = min(max((p - self.shift) / (1 - self.shift), 0.0), 1.0) if self.shift < 1 else 0.0
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * q)) / 2

    def values(self) -> tuple[float, float]:
        return self.start, self.end


class DepthSpec(Spec):
    """Mixture-of-Depths for a block: the top `ratio` of each sequence's candidate tokens (tokens
    of `modalities`, all when empty) go through the block, scaled by weight(router score)."""

    always_shown: ClassVar[tuple[str, ...]] = ("ratio",)
    ratio: float | LayerScheduleSpec
    modalities: tuple[int, ...] = ()
    weight: Literal["sigmoid", "tanh"] = "sigmoid"

    def ratio_at(self, layer: int, num_layers: int) -> float:
        r = self.ratio if isinstance(self.ratio, float) else self.ratio.at(layer, num_layers)
        return min(max(r, 0.0), 1.0)


class RouterSpec(Spec):
    """How a group's tokens choose experts. `slots` is the fixed number of (token, slot) pairs per
    token the router produces (unused slots carry expert id -1)."""

    always_shown: ClassVar[tuple[str, ...]] = ("kind", "k", "score", "renormalize", "scale")
    kind: Literal["top_k", "expert_choice", "dynamic_k", "deterministic", "soft", "group_limited"] = "top_k"
    k: int = 1
    score: Literal["softmax", "sigmoid"] = "softmax"
    temperature: float | ScheduleSpec = 1.0  # softmax(logits / temperature); a schedule anneals it
    renormalize: bool = False
    scale: float = 1.0
    capacity: float | None = None
    drop: Literal["position", "probability"] = "position"
    jitter: float = 0.0
    group_size: int | None = None
    threshold: float | None = None
    k_min: int = 1
    by: Literal["modality", "task", "hash"] | None = None
    groups: int | None = None
    top_groups: int | None = None
    bias_update: float = 0.0

    @property
    def learned(self) -> bool:
        return self.kind != "deterministic"

    def slots(self, num_experts: int) -> int:
        if self.kind in ("expert_choice", "soft"):
            return num_experts
        if self.kind == "deterministic":
            return 1
        return self.k  # top_k, group_limited; dynamic_k stores k_max in k

    def experts_per_token(self, num_experts: int) -> tuple[float, int, int]:
        """(expected, min, max) experts a token is processed by. Expected values of dynamic
        routers assume uniform scores (the state at initialisation)."""
        e = num_experts
        if self.kind == "expert_choice":
            return min(self.capacity, e), 0, e
        if self.kind == "soft":
            return e, e, e
        if self.kind == "deterministic":
            return 1, 1, 1
        if self.kind == "dynamic_k":
            uniform = min(max(math.ceil(self.threshold * e - 1e-9), self.k_min), self.k)
            return uniform, self.k_min, self.k
        if self.capacity is not None:
            return min(self.k, self.capacity * self.k), 0, self.k
        return self.k, self.k, self.k


class LossSpec(Spec):
    always_shown: ClassVar[tuple[str, ...]] = ("load_balance", "z_loss")
    load_balance: float = 0.0
    z_loss: float = 0.0


class RecurrentSpec(Spec):
    """A recurrent router (RMoE): one GRU cell of `hidden` units shared by every MoE layer reads a
    `projection`-wide per-layer projection of the router input; the router gate reads the state."""

    always_shown: ClassVar[tuple[str, ...]] = ("cell", "hidden", "projection")
    cell: Literal["gru"] = "gru"
    hidden: int
    projection: int


class GroupSpec(Spec):
    """Experts routed among the tokens of some modalities (all declared ones when ungrouped)."""

    name: str
    modalities: tuple[int, ...]
    num_experts: int
    expert: ExpertSpec
    router: RouterSpec
    shared: ExpertSpec | None = None  # always-on experts of the group, run as one wide FFN
    num_shared: int = 0
    num_identity: int = 0  # zero-computation experts in the routed pool: ids E .. E+I-1 return the input,
    num_zero: int = 0      # ids E+I .. E+I+Z-1 return zero; the router chooses among all of them

    @property
    def routed_experts(self) -> int:
        """Experts the router chooses among: computed ones first, then identity, then zero."""
        return self.num_experts + self.num_identity + self.num_zero


class OpBase(Spec):
    name: str  # dotted module path in generated code, e.g. "layers.3.moe"
    layer: int | None = None  # index of the layer this op belongs to
    block: str | None = None  # block kind key of that layer
    loc: SourceLoc | None = None


class InputOp(OpBase):
    kind: Literal["input"] = "input"
    dim: int
    modalities: tuple[str, ...]
    input_modalities: tuple[str, ...]


class OutputOp(OpBase):
    kind: Literal["output"] = "output"


class NormOp(OpBase):
    quiet_when_default: ClassVar[tuple[str, ...]] = ("per_modality",)
    kind: Literal["norm"] = "norm"
    norm: Literal["rms", "layer"]
    dim: int
    eps: float
    per_modality: tuple[int, ...] = ()  # Mixture-of-Transformers: a copy per modality id (input 2: ids)


class AttentionOp(OpBase):
    quiet_when_default: ClassVar[tuple[str, ...]] = ("rope_theta", "qk_norm", "norm_eps", "out_bias", "per_modality",
                                                     "routed_heads", "shared_heads", "kept_tokens")
    kind: Literal["attention"] = "attention"
    per_modality: tuple[int, ...] = ()  # q/k/v/o projections per modality id; one attention over all tokens
    routed_heads: int | None = None  # mixture-of-heads: top-k of the non-shared heads per token
    shared_heads: int = 0  # mixture-of-heads: always-on heads (the first ones)
    kept_tokens: bool = False  # in a Mixture-of-Depths block: attends among the kept tokens (last input: the route)
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    bias: bool = False
    causal: bool = True
    rope_theta: float | None = None  # rotary position embeddings (rotate-half) with this base
    qk_norm: Literal["none", "head", "projection"] = "none"  # RMSNorm of q and k, per head or whole projection
    norm_eps: float = 1e-6  # eps of the q/k norms
    out_bias: bool | None = None  # None: the output projection follows `bias`

    @property
    def o_bias(self) -> bool:
        return self.bias if self.out_bias is None else self.out_bias


class AttentionExpertsOp(OpBase):
    """Attention experts (mixture of attention, JetMoE; BAM with shared key and value): expert e
    has its own query projection [dim, heads * head_dim] and output projection [heads * head_dim,
    dim]; one key and value projection serves every expert and token. A softmax router over the
    normed input picks `top_k` experts per token; a token's output is the routing-weighted sum of
    its experts' attention outputs (queries of expert e against the shared keys and values).
    Outputs: (x, aux loss, tokens per expert) like `moe`."""

    quiet_when_default: ClassVar[tuple[str, ...]] = ("rope_theta", "qk_norm", "norm_eps", "out_bias")
    kind: Literal["attention_experts"] = "attention_experts"
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    renormalize: bool = False
    losses: LossSpec = LossSpec()
    bias: bool = False  # q bias per expert, k / v biases shared
    causal: bool = True
    rope_theta: float | None = None
    qk_norm: Literal["none", "head", "projection"] = "none"  # q / k norms shared by the experts
    norm_eps: float = 1e-6
    out_bias: bool | None = None  # output bias per expert (weighted like its output); None: follows `bias`

    @property
    def o_bias(self) -> bool:
        return self.bias if self.out_bias is None else self.out_bias


class LatentAttentionOp(OpBase):
    """DeepSeek-V2/V3 multi-head latent attention (causal, rotary on the decoupled qk_rope_dim part)."""

    kind: Literal["latent_attention"] = "latent_attention"
    dim: int
    heads: int
    kv_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_dim: int
    q_rank: int | None = None  # None: one q projection, no query latent
    rope_theta: float = 10000.0
    rope_interleave: bool = False
    bias: bool = False
    eps: float = 1e-6  # eps of the latent RMSNorms

    @property
    def params(self) -> int:
        h, qk = self.heads, self.qk_nope_dim + self.qk_rope_dim
        q = self.dim * h * qk if self.q_rank is None else (
            self.dim * self.q_rank + self.q_rank + self.q_rank * h * qk + (self.q_rank if self.bias else 0))
        kv = (self.dim * (self.kv_rank + self.qk_rope_dim) + self.kv_rank
              + self.kv_rank * h * (self.qk_nope_dim + self.v_dim))
        if self.bias:
            kv += self.kv_rank + self.qk_rope_dim
        out = h * self.v_dim * self.dim + (self.dim if self.bias else 0)
        return q + kv + out

    @property
    def flops(self) -> int:
        """Forward FLOPs per token of the projections (2 per multiply-accumulate)."""
        h, qk = self.heads, self.qk_nope_dim + self.qk_rope_dim
        q = self.dim * h * qk if self.q_rank is None else self.dim * self.q_rank + self.q_rank * h * qk
        kv = self.dim * (self.kv_rank + self.qk_rope_dim) + self.kv_rank * h * (self.qk_nope_dim + self.v_dim)
        return 2 * (q + kv + h * self.v_dim * self.dim)


class FFNOp(OpBase):
    quiet_when_default: ClassVar[tuple[str, ...]] = ("gate", "per_modality")
    kind: Literal["ffn"] = "ffn"
    expert: ExpertSpec
    per_modality: tuple[int, ...] = ()  # a copy of the FFN per modality id
    gate: Literal["none", "sigmoid"] = "none"  # sigmoid: output scaled by sigmoid(x . w) per token


class DepthRouteOp(OpBase):
    """Mixture-of-Depths routing of one layer: (x, modality, task) -> (route, x, modality, task) of
    the kept tokens. `route` holds the kept rows, their sequences, positions and weights."""

    quiet_when_default: ClassVar[tuple[str, ...]] = ("modalities",)
    kind: Literal["depth_route"] = "depth_route"
    dim: int
    ratio: float
    modalities: tuple[int, ...] = ()  # candidate modality ids; empty: every token is a candidate
    weight: Literal["sigmoid", "tanh"] = "sigmoid"


class DepthCombineOp(OpBase):
    """(x, y_kept, route) -> x with each kept token's row x + w * (y - x) (w = 1 for tokens of
    non-candidate modalities); skipped tokens keep x."""

    kind: Literal["depth_combine"] = "depth_combine"


class AddOp(OpBase):
    kind: Literal["add"] = "add"


class MoEOp(OpBase):
    quiet_when_default: ClassVar[tuple[str, ...]] = ("iterations", "shared_gate", "recurrent")
    kind: Literal["moe"] = "moe"
    dim: int
    groups: tuple[GroupSpec, ...]
    shared: ExpertSpec | None = None  # always-on experts over all tokens, fused into one FFN
    num_shared: int = 0
    losses: LossSpec = LossSpec()
    iterations: int = 1  # chain-of-experts: h_{c+1} = h_c + moe_c(h_c), a router per iteration, shared experts
    shared_gate: Literal["none", "sigmoid"] = "none"  # gate on the shared experts' output
    recurrent: RecurrentSpec | None = None  # routers read a GRU state (input 3) instead of the token


class RouterStateOp(OpBase):
    """A recurrent router's state update (RMoE): h_l = GRU(P_l x_l, h_{l-1}) for every token, with
    P_l this layer's projection (dim -> projection) and one GRU cell shared by every MoE layer.
    Inputs: the router input x_l and, after the first MoE layer, the previous layer's state
    (absent: h_0 = 0)."""

    kind: Literal["router_state"] = "router_state"
    cell: Literal["gru"] = "gru"
    dim: int
    hidden: int
    projection: int

    @property
    def projection_params(self) -> int:
        return self.dim * self.projection

    @property
    def cell_params(self) -> int:
        """weight_ih [3H, p], weight_hh [3H, H] and their biases (torch.nn.GRUCell)."""
        h = self.hidden
        return 3 * h * (self.projection + h) + 6 * h

    @property
    def flops(self) -> int:
        """Forward FLOPs per token of the projection and the cell's two GEMMs."""
        return 2 * (self.dim * self.projection + 3 * self.hidden * (self.projection + self.hidden))


# ---- primitives produced by lower-moe ------------------------------------------------------
class SelectTokensOp(OpBase):
    kind: Literal["select_tokens"] = "select_tokens"
    modalities: tuple[int, ...]  # indices into the declared modalities
    modality_names: tuple[str, ...]


class RouterGateOp(OpBase):
    quiet_when_default: ClassVar[tuple[str, ...]] = ("jitter", "balance_rate")
    kind: Literal["router_gate"] = "router_gate"
    dim: int
    num_experts: int
    jitter: float = 0.0  # multiplicative input noise in training
    balance_rate: float = 0.0  # > 0: a selection-only score bias updated after each step


class RouteOp(OpBase):
    """Expert selection from router scores (or, for deterministic routers, from modality / task /
    position): weights, expert ids ([T, slots], -1 for unused slots) and probabilities."""

    kind: Literal["route"] = "route"
    router: RouterSpec
    num_experts: int


class SortByExpertOp(OpBase):
    """Indices of the (token, slot) pairs ordered by expert id (stable within an expert)."""

    kind: Literal["sort_by_expert"] = "sort_by_expert"
    num_experts: int


class CountExpertsOp(OpBase):
    kind: Literal["count_experts"] = "count_experts"
    num_experts: int


class ExpertOffsetsOp(OpBase):
    """Start of each expert's segment in the sorted rows (exclusive prefix sum of the counts)."""

    kind: Literal["expert_offsets"] = "expert_offsets"
    num_experts: int


class PermuteOp(OpBase):
    """fuse-permute's result: sort, counts and offsets in one op, segments padded to block_m."""

    kind: Literal["permute"] = "permute"
    num_experts: int
    block_m: int = 1


class MaskExpertsOp(OpBase):
    """Expert ids of the computed experts only: slots routed to a zero-computation expert
    (id >= num_experts) become -1, so no GEMM sees them."""

    kind: Literal["mask_experts"] = "mask_experts"
    num_experts: int


class IdentityExpertsOp(OpBase):
    """The identity experts' share of the output: x times the routing weight of every slot whose
    expert id is in [first, first + count)."""

    kind: Literal["identity_experts"] = "identity_experts"
    first: int
    count: int


class GatherRowsOp(OpBase):
    """The permuted copy of the token rows: row i is token order[i] // k."""

    kind: Literal["gather_rows"] = "gather_rows"


class ExpertGemmOp(OpBase):
    """Rows of expert e times W[e] for every expert segment (a grouped GEMM)."""

    kind: Literal["expert_gemm"] = "expert_gemm"
    num_experts: int
    quiet_when_default: ClassVar[tuple[str, ...]] = ("weights", "lora_rank", "lora_alpha", "lora_on")
    projection: Literal["up", "gate", "down"]
    in_dim: int
    out_dim: int
    bias: bool = False
    weights: Literal["full", "ternary"] = "full"
    lora_rank: int | None = None  # see ExpertSpec
    lora_alpha: float | None = None
    lora_on: tuple[Literal["gate", "up", "down"], ...] | None = None

    @property
    def adapted(self) -> bool:
        return self.lora_rank is not None and (self.lora_on is None or self.projection in self.lora_on)


class ActivationOp(OpBase):
    kind: Literal["activation"] = "activation"
    act: Literal["silu", "gelu", "gelu_tanh", "relu", "identity"]
    glu: bool


class CombineOp(OpBase):
    """Rows times their routing weights, summed back into token order."""

    kind: Literal["combine"] = "combine"
    dim: int


class RouterOp(OpBase):
    """fuse-router's result: gate GEMM + score function + top-k (+ renormalisation, scaling)."""

    quiet_when_default: ClassVar[tuple[str, ...]] = ("balance_rate",)
    kind: Literal["router"] = "router"
    dim: int
    num_experts: int
    router: RouterSpec
    balance_rate: float = 0.0


class FusedExpertsOp(OpBase):
    """fuse-expert-gemm's result: gather in the first GEMM's prologue, activation fused, routing
    weight and scatter-combine in the last GEMM's epilogue: one op per expert group."""

    kind: Literal["fused_experts"] = "fused_experts"
    num_experts: int
    expert: ExpertSpec


class ScatterTokensOp(OpBase):
    kind: Literal["scatter_tokens"] = "scatter_tokens"


class AuxLossOp(OpBase):
    kind: Literal["aux_loss"] = "aux_loss"
    losses: LossSpec
    num_experts: int


Op = Annotated[
    InputOp | OutputOp | NormOp | AttentionOp | AttentionExpertsOp | LatentAttentionOp | FFNOp | DepthRouteOp | DepthCombineOp | AddOp | MoEOp | RouterStateOp | SelectTokensOp | RouterGateOp | RouteOp | MaskExpertsOp | IdentityExpertsOp | PermuteOp | ExpertGemmOp | ActivationOp | CombineOp | ScatterTokensOp | AuxLossOp,
    Field(discriminator="kind"),
]
