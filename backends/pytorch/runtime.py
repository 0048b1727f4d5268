"""moec PyTorch runtime: routing, expert dispatch and auxiliary losses for MoE layers.

This file is copied verbatim next to generated model code as ``moec_runtime.py``.
It depends only on ``torch`` and the standard library (never on ``moec``).

Shapes below: ``T`` tokens, ``E`` experts, ``k`` experts per token, ``d`` model
width, ``f`` expert hidden width.  ``T == 0`` (an empty modality group) is
supported everywhere.  No function loops in Python over tokens; the only
Python-level loop is the per-expert loop of ``moe_experts(method="split")``.

Public API
----------
``route_top_k(logits, k, score="softmax", renormalize=False, scale=1.0, bias=None)``
    -> ``(weights[T, k], expert_ids[T, k] int64, probs[T, E])`` in fp32 (fp64 for fp64 logits).
    ``probs = softmax(logits)`` or ``sigmoid(logits)`` (``score`` in
    {"softmax", "sigmoid"}), computed in fp32 (fp64 for fp64 logits).  If ``bias`` ([E]) is
    given it is added to ``probs`` for *selection only*; the returned weights
    are gathered from the unbiased ``probs``.  With ``renormalize`` the weights
    are divided by their per-token sum (``+1e-20`` guard for sigmoid scores),
    then multiplied by ``scale``.  The k selected experts are always distinct.
    Ties in the (possibly biased) scores go to the lower expert id (``top_k``),
    on every device and target.  Returned ``expert_ids`` are in descending
    score order.

``top_k(scores, k)`` -> ``(values[T, k], indices[T, k])``
    The k largest entries per row, descending, ties to the lower index (every
    moec target's rule; a compiled pass per row on the CPU, k rounds of
    max-and-take under ``torch.export``).  ``descending_rank(scores)``: each entry's place in its
    row's stable descending order (comparisons under ``torch.export``).

``expert_counts(expert_ids, num_experts, token_mask=None)`` -> ``LongTensor[E]``
    Number of (token, slot) assignments per expert, computed on the device
    with ``scatter_add_`` (no host sync).  Entries equal to -1 (dropped slots)
    are ignored, and so are the slots of tokens outside ``token_mask`` ([T]
    bool) when it is given.  ids must lie in [-1, E).

``moe_experts(x, expert_ids, weights, up_proj, down_proj, gate_proj=None,
activation="silu", up_bias=None, down_bias=None, gate_bias=None, method="auto")``
    -> ``Tensor[T, d]`` with ``y[t] = sum_j weights[t, j] * FFN_{expert_ids[t, j]}(x[t])``
    where ``FFN_e(x) = (act(x @ gate_e + gb_e) * (x @ up_e + ub_e)) @ down_e + db_e``
    if ``gate_proj`` is given (GLU, e.g. SwiGLU) else
    ``FFN_e(x) = act(x @ up_e + ub_e) @ down_e + db_e``.
    ``up_proj``/``gate_proj``: [E, d, f]; ``down_proj``: [E, f, d];
    ``up_bias``/``gate_bias``: [E, f]; ``down_bias``: [E, d] (all optional).
    ``activation`` in {"silu", "gelu", "gelu_tanh", "relu", "identity"}.
    ``expert_ids == -1`` marks a dropped slot that contributes nothing (its
    weight receives a zero gradient).  Differentiable w.r.t. ``x``,
    ``weights`` and all expert tensors.  The result has ``x.dtype``; the
    weighted combine is accumulated with ``index_add_`` in fp32 (fp64 if
    ``x`` is fp64), whatever the dtype of ``weights``.  Under ``torch.autocast``
    ``x`` and the expert tensors are cast to its dtype first (the result has
    that dtype), as ``F.linear`` would.
    Dispatch: the flat (token, slot) pairs are sorted by expert (stable
    argsort), per-expert counts/offsets are computed on the device, token rows
    are gathered once, the projections run as grouped GEMMs over the stacked
    expert weights, the routing weight is multiplied in, and rows are
    scattered back with ``index_add_``.  ``method`` selects the grouped GEMM:

    * ``"grouped_mm"``: ``torch._grouped_mm`` with int32 cumulative offsets,
      0 host syncs.  On the CPU, when a backward will run, the activations and
      their gradients run as ``torch._grouped_mm`` but the stacked weight
      gradients one ``mm`` per expert into memory kept between steps (see
      ``free_gradient_buffers``; 1 host sync for the segment sizes).
      Used only if a one-time probe (cached per device/dtype)
      shows it works and the operands satisfy its 16-byte stride alignment
      (``d`` and ``f`` multiples of 4 for fp32, 8 for bf16/fp16) and share
      one dtype; otherwise it silently falls back to ``"split"``.
    * ``"split"``: ``counts.tolist()`` (1 host sync), ``torch.split`` of the
      sorted rows and one ``mm`` per non-empty expert.
    * ``"padded_bmm"``: ``counts.tolist()`` (1 host sync), rows scattered
      into an ``[E, C, d]`` buffer with ``C = max count``, then ``torch.bmm``
      (cost grows with routing skew: E * C rows are computed).
    * ``"auto"``: ``resolve_method("auto", ...)``; see that function.

    Performance note (CPU): subnormal routing weights (e.g. softmax of very
    peaked fp32 logits, probabilities ~1e-40) make fwd+bwd ~10x slower for
    every method (measured 930 ms vs 103 ms at E=64, k=8, T=2048, d=f=256);
    ``torch.set_flush_denormal(True)`` in the caller avoids it.

``moe_lora_experts(x, expert_ids, weights, experts, activation="silu", order=None, offsets=None)``
    -> ``Tensor[T, d]``: ``moe_experts`` for ``LoRAExperts`` (expert e's matrices
    ``W0 + s A_e B_e``) without building the merged [E, in, out] weights: the frozen base runs
    as dense GEMMs (up and gate once per token), the rank-r adapters as grouped GEMMs over the
    rows sorted by expert (``torch._grouped_mm`` where it runs, else one ``mm`` per expert and
    one host sync).

``resolve_method(method, x, up_proj, down_proj, gate_proj=None, k=1, counts=None)`` -> str
    The concrete method ("grouped_mm", "split" or "padded_bmm") that
    ``moe_experts`` runs for these operands (``k`` = slots per token,
    ``counts`` = optional host list of per-expert counts, length E or E+1).
    ``"auto"`` follows measurements recorded in comments next to
    ``_CPU_GROUPED_MAX_ROWS_BYTES_TRAIN`` / ``_CPU_LOWP_PADDED_MAX_PAD_RATIO``:

    * CPU, bf16/fp16, ``counts`` given: "padded_bmm" if the padding ratio
      ``E * max(counts) / sum(counts)`` is <= 1.75 (``moe_experts`` fetches
      the counts for this case with its single host sync);
    * CPU otherwise, when autograd will run a backward through the call
      (grad mode on and ``x`` or an expert weight requires grad):
      "grouped_mm" while the sorted rows are small, ``T*k*max(d, f)`` elements
      <= 4 MiB, else "split" (grouped_mm saves split's per-expert Python
      dispatch; with more rows its [T*k, d] and [T*k, f] buffers cost more
      memory traffic, and more peak memory, than split's per-expert ones);
      for a forward only,
      "grouped_mm" when ``T*k/E`` <= 32, else "split";
    * other devices: "grouped_mm" (no host sync).

    "grouped_mm" resolves to "split" when ``grouped_mm_available`` is False
    or the operands violate its alignment/dtype requirements.

``grouped_mm_available(device, dtype)`` -> bool
    Whether ``torch._grouped_mm`` exists and a tiny forward+backward probe
    matches a reference on this device/dtype.  The result is cached.

``load_balance_loss(probs, expert_ids, num_experts)`` -> scalar fp32
    Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` with ``f_e`` the
    fraction of valid (token, slot) assignments routed to ``e`` (-1 ignored;
    not differentiable) and ``P_e = probs[:, e].mean()``.  Uniform routing
    gives 1.0.  Returns 0 when ``T == 0``.

``z_loss(logits)`` -> scalar fp32
    Router z-loss ``mean_t(logsumexp(logits[t])^2)`` (fp32); 0 when ``T == 0``.

``free_gradient_buffers()``
    On the CPU the "split" path writes the gradient of each stacked expert weight (a leaf)
    into memory it keeps from one backward to the next, reused once the previous gradient is
    gone (``zero_grad()``) or was added into ``.grad``; memory still referenced (a kept
    gradient, a view of it, a result of ``torch.autograd.grad``) is never written. This saves
    the page faults of mapping a fresh stacked gradient every step (glibc maps allocations of
    32 MiB and more anew), and keeps one gradient-sized buffer per stacked weight allocated
    between steps, as ``zero_grad(set_to_none=False)`` does.  ``free_gradient_buffers()``
    releases them (e.g. after training).

``HOST_SYNCS``: dict[str, int]
    Host synchronisations (``.item()``, ``.tolist()``, ``.cpu()``, or a
    data-dependent output shape) per ``moe_experts`` call, per method, at most:
    grouped_mm 1 (0 when it runs natively on another device or for a forward
    alone; on the CPU its backward writes the stacked weight gradients per
    expert and fetches the segment sizes once; its fallback is "split"), split 1
    (``counts.tolist()``), padded_bmm 1 (the same ``tolist``, C = max);
    "auto" is the upper bound over what it can resolve to: 1.  ``route_top_k``,
    ``expert_counts``, ``load_balance_loss`` and ``z_loss`` make no host sync.

Layers used by generated models: ``RMSNorm`` (``nn.RMSNorm`` with a faster fp32/fp64 CPU path:
the statistics in one reduction pass and a hand-written backward), ``Attention`` (multi-head / grouped-query,
``q_proj k_proj v_proj o_proj``, optional rotary embeddings and q/k RMSNorm),
``LatentAttention`` (DeepSeek's multi-head latent attention), ``FeedForward`` (a dense expert,
``up_proj gate_proj down_proj`` linears, optional sigmoid ``output_gate``), ``Experts`` (stacked expert weights ``up_proj /
gate_proj [E, d, f]``, ``down_proj [E, f, d]``), ``Container`` (a namespace of
submodules), ``ModelOutput`` (``output, aux_loss, expert_counts``),
``check_modality`` (input validation), ``select_tokens`` / ``scatter_tokens``
(gather a modality group's rows and put them back; ``select_tokens`` costs one
host sync, its data-dependent size).

Unfused primitives, one per op of an unfused lowering (``moec ir --after lower-moe``):
``sort_by_expert``, ``expert_offsets``, ``permute`` (the three fused), ``gather_rows``,
``grouped_linear`` (one host sync: the segment sizes), ``activate``, ``combine``.
``moe_experts`` is their fusion; with ``order`` / ``offsets`` from ``permute`` it reuses that sort.

``ternarize(weight)``: {-1, 0, 1} x mean|w| per expert (absmean), straight-through gradient; used
for experts declared with ``weights = ternary`` (``FeedForward(ternary=True)`` for dense ones).

``rotary_cos_sin(seq, dim, theta, device, dtype)`` -> ``(cos, sin)`` [seq, dim] at positions
0..seq-1, and ``apply_rotary(t, cos, sin, interleaved=False)``: rotary position embeddings as
transformers computes them (rotate-half pairs i with i + dim/2; interleaved pairs 2i with 2i+1).

``ACTIVATIONS``: tuple of the supported activation names.
``METHODS``: tuple of the accepted ``method`` names.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

try:  # inside the moec package
    from . import cpu_fused as _cpu_fused
except ImportError:  # shipped next to generated code, beside moec_cpu_fused.py
    import moec_cpu_fused as _cpu_fused

__all__ = [
    "ACTIVATIONS",
    "HOST_SYNCS",
    "METHODS",
    "Attention",
    "Container",
    "Experts",
    "FeedForward",
    "LatentAttention",
    "ModelOutput",
    "RMSNorm",
    "activate",
    "apply_rotary",
    "check_modality",
    "combine",
    "descending_rank",
    "expert_counts",
    "expert_offsets",
    "free_gradient_buffers",
    "gather_rows",
    "grouped_linear",
    "grouped_mm_available",
    "load_balance_loss",
    "moe_experts",
    "moe_lora_experts",
    "permute",
    "resolve_method",
    "rotary_cos_sin",
    "route_top_k",
    "scatter_tokens",
    "select_tokens",
    "sort_by_expert",
    "ternarize",
    "top_k",
    "z_loss",
]

HOST_SYNCS: dict[str, int] = {
    "grouped_mm": 1,  # 0 except on the CPU when a backward will run
    "split": 1,
    "padded_bmm": 1,
    "auto": 1,
}

METHODS = ("auto", "grouped_mm", "split", "padded_bmm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")

# Measurements behind "auto" (torch 2.13.0+cpu, 2 threads of an AVX-512 VM, fp32, SwiGLU,
# silu, random softmax top-k routing; one forward+backward of moe_experts, median ms of
# 11-25 interleaved reps; benchmarks/moe_dispatch.py and an A/B script; ~5-10% noise):
#
#   E    k  T     d    f    rows/expert   grouped_mm   split   padded_bmm
#   8    2  256   64   128      64            1.66      1.95      1.39
#   16   2  512   256  256      64            8.27     10.32      9.77
#   256  8  512   128  64       16           19.69     40.86     14.89
#   128  4  2048  256  256      64           82.54     97.62     96.73
#   256  4  2048  256  256      32          123.19    162.46    129.32
#   64   4  2048  256  256     128           62.42     66.66     67.13
#   8    2  1024  256  512     256           21.57     22.63     23.10
#   32   4  2048  256  256     256           54.15     52.68     57.45
#   64   8  2048  256  256     256          123.61    106.52    123.09
#   8    4  2048  256  256    1024           41.31     42.95     49.95
#
# On CPU torch._grouped_mm is a C++ loop of mm_out calls: it removes split's per-expert Python
# and autograd-node overhead (~75 us per expert and fwd+bwd here), which dominates with few
# rows per expert.  Through autograd, though, its backward allocates the stacked [E, d, f]
# weight gradients afresh every step, and glibc maps large allocations anew each time (page
# faults: 4k-32k per step at 64 experts, 20-25 ms).  So when a backward will run, grouped_mm on
# the CPU is _GroupedExperts: grouped GEMMs for the activations and their gradients, the weight
# gradients one mm per expert into memory kept between steps, as split does.  fwd+bwd of
# moe_experts alone (SwiGLU, leaf weights, .grad set to None every step, median ms;
# "autograd" = torch._grouped_mm differentiated by autograd, the rule before _GroupedExperts):
#
#   E    k  T     d    f    T*k*max(d,f)*4  split   autograd  _GroupedExperts
#   32   4  256   64   64       256 KiB      4.14     2.59       2.48
#   256  8  512   128  64       2 MiB       35.59    24.38      20.96
#   64   8  256   256  256      2 MiB       27.59    29.39      22.64
#   128  4  1024  256  256      4 MiB       56.85    66.59      48.68
#   64   8  64    512  256      1 MiB       30.13    45.56      24.92
#   64   8  256   512  256      4 MiB       45.71    63.38      39.68
#   64   8  512   512  256      8 MiB       66.39    94.01      61.40
#   64   8  1024  512  256     16 MiB       96.89   116.96      97.99
#   64   8  2048  512  256     32 MiB      168.55   294.88     219.74
#   64   8  4096  512  256     64 MiB      303.68   528.99     410.78
#   64   6  256   512  256      3 MiB       41.97    58.73      35.64
#   64   6  1024  512  256     12 MiB       80.64   109.33      80.59
#   8    2  64    512  1024    512 KiB     15.00    21.61      13.31
#   8    2  256   512  1024     2 MiB      28.22    27.78      27.52
#   8    2  1024  512  1024     8 MiB      74.87    77.58      72.22
#   8    2  2048  512  1024    16 MiB     134.00   150.46     138.63
#   8    2  4096  512  1024    32 MiB     252.66   299.45     261.65
#
# Past ~8 MiB of sorted rows the [T*k, d] / [T*k, f] buffers of the grouped path cost more
# memory traffic than split's per-expert ones, which stay in cache; they also raise the peak
# memory of a training step (its backward holds [T*k, d] and [T*k, f] gradients at once: at
# E=8 k=2 T=1024 d=512 f=1024, 104-110 MB against split's 93 MB and the benchmark's per-expert
# loop's 82-129 MB), so the limit is 4 MiB, where the peak stays within a few MB of split's.
#
# Forward alone (no gradients, no faults), whole benchmarks/moe_layer.py layer, grouped_mm /
# split: E=64 k=8 d=512 f=256 at 8 / 32 / 64 rows per expert 8.2 / 10.3, 14.4 / 15.0,
# 28.4 / 21.4 ms; E=8 k=2 d=512 f=1024 at 16 / 64 rows 3.8 / 4.3, 8.1 / 8.1 ms.
#
# padded_bmm wins some small balanced fp32 shapes but its [E, max_count, d] buffer degenerates
# with skewed routing, so for fp32 auto never picks it.  Rule on CPU: when a backward will run
# through the call, grouped_mm while T*k*max(d, f) elements take at most 4 MiB, else split;
# for a forward alone, grouped_mm if T*k/E <= 32, else split.  Other devices -> grouped_mm (no
# host sync).  grouped_mm falls back to split if it is unusable (probe failed, misaligned
# strides, mixed dtypes).
_CPU_GROUPED_MAX_ROWS_BYTES_TRAIN = 4 << 20  # T * k * max(d, f) * element size, fwd+bwd
_CPU_GROUPED_MAX_ROWS_FORWARD = 32  # rows per expert, forward only
#
# bf16 on CPU (same setup, 7 reps): padded_bmm's single batched bf16 bmm beats the per-expert
# bf16 mm loops clearly while routing is balanced; pad ratio = E * max_count / (T*k):
#
#   E    k  T     d    f    pad ratio   grouped_mm   split   padded_bmm
#   8    2  256   64   128    ~1.2          2.45      2.88      1.26
#   32   4  256   64   64     ~1.45         6.30      7.87      1.64
#   8    2  1024  256  512    ~1.1         12.73     12.63      9.41
#   64   8  2048  256  256    ~1.1         83.32     81.99     60.12
#   128  4  2048  256  256    ~1.3         75.38     84.16     44.76
#   64   8  2048  256  256     1.94        99.9      84.0      67.5     (one hot expert)
#   64   8  2048  256  256     2.22        77.3      84.8      76.5
#   64   8  2048  256  256     3.52        72.6      83.3     130.7
#
# so on CPU with bf16/fp16 "auto" fetches the counts (the same single host sync split and
# padded_bmm need) and takes padded_bmm when the pad ratio is <= 1.75 (break-even ~2.2),
# else the rows-per-expert rule above.
_CPU_LOWP_PADDED_MAX_PAD_RATIO = 1.75


# --------------------------------------------------------------------------- routing


def _at_least_fp32(t: Tensor) -> Tensor:
    """Routing math runs in fp32, or in fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def descending_rank(scores: Tensor) -> Tensor:
    """Each entry's place in its row's descending order (int64, shaped like ``scores``), ties in
    index order: a stable sort's. Under ``torch.export`` (the static form, which torch-mlir
    lowers, and no dialect lowers a stable sort) the places come from comparisons instead: the
    entries above, plus the equal ones before; O(S^2) per row."""
    S = scores.shape[-1]
    ids = torch.arange(S, device=scores.device)
    if not torch.compiler.is_exporting():
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return torch.empty_like(order).scatter_(-1, order, ids.expand_as(order))
    other, entry = scores.unsqueeze(-2), scores.unsqueeze(-1)  # [..., 1, S] and [..., S, 1]
    return ((other > entry) | ((other == entry) & (ids < ids.unsqueeze(1)))).sum(-1)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``scores`` [T, E] and their indices (int64), in
    descending order, ties to the lower index: the rule of every moec target (the Triton kernels
    and the HLS C++ too), where ``torch.topk`` leaves the tied choice to the build and device.
    The values are gathered from ``scores`` (differentiable). On the CPU one compiled pass per row
    (``moec_cpu_fused.top_k_indices``, faster than ``torch.topk``); else a stable sort; under
    ``torch.export`` (no MLIR dialect lowers a sort) k rounds of max-and-take, O(k E) per row."""
    if torch.compiler.is_exporting():
        ids = _top_k_by_rounds(scores.detach(), k)
    elif (scores.device.type == "cpu" and not torch.compiler.is_compiling()
          and _cpu_fused.available(scores.dtype)):
        ids = _cpu_fused.top_k_indices(scores, k)
    else:
        ids = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, ids), ids


def _top_k_by_rounds(scores: Tensor, k: int) -> Tensor:
    """The indices of ``top_k`` from k rounds: each takes the lowest untaken index among the
    untaken entries equal to their maximum. NaN ranks above +inf, as in the eager paths. Only
    reductions, comparisons and ``where``, which every MLIR dialect lowers."""
    E = scores.shape[1]
    index = torch.arange(E, device=scores.device)
    nan = torch.isnan(scores)
    taken = torch.zeros_like(nan)
    picks = []
    for _ in range(k):
        untaken_nan = nan & ~taken
        best = torch.where(taken | nan, float("-inf"), scores).amax(dim=1, keepdim=True)
        hit = torch.where(untaken_nan.any(dim=1, keepdim=True), untaken_nan, ~taken & (scores == best))
        pick = torch.where(hit, index, E).amin(dim=1, keepdim=True)  # [T, 1]
        taken = taken | (index == pick)
        picks.append(pick)
    return torch.cat(picks, dim=1) if picks else torch.zeros_like(scores[:, :0], dtype=torch.long)


def route_top_k(
    logits: Tensor,
    k: int,
    score: str = "softmax",
    renormalize: bool = False,
    scale: float = 1.0,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing.  Returns ``(weights[T,k], expert_ids[T,k] int64, probs[T,E])``, fp32 or fp64."""
    if logits.dim() != 2:
        raise ValueError(f"route_top_k: logits must be [T, E], got {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if not 0 <= k <= num_experts:
        raise ValueError(f"route_top_k: k={k} must be in [0, {num_experts}]")
    logits32 = _at_least_fp32(logits)
    if score == "softmax":
        probs = torch.softmax(logits32, dim=-1)
    elif score == "sigmoid":
        probs = torch.sigmoid(logits32)
    else:
        raise ValueError(f"route_top_k: unknown score {score!r} (expected 'softmax' or 'sigmoid')")
    if bias is not None:
        if bias.shape != (num_experts,):
            raise ValueError(f"route_top_k: bias must be [{num_experts}], got {tuple(bias.shape)}")
        selection = probs + bias.to(device=probs.device, dtype=probs.dtype)
    else:
        selection = probs
    expert_ids = top_k(selection.detach(), k)[1]
    weights = probs.gather(-1, expert_ids)
    if renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        if score == "sigmoid":
            denom = denom + 1e-20
        weights = weights / denom
    if scale != 1.0:
        weights = weights * scale
    return weights, expert_ids, probs


def _counts_with_dropped(flat_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(key, counts[E+1]): key maps -1 to bin E so dropped slots sort last."""
    key = torch.where(flat_ids < 0, torch.full_like(flat_ids, num_experts), flat_ids)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return key, counts


def expert_counts(expert_ids: Tensor, num_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """Assignments per expert (LongTensor[E]); -1 entries, and the slots of tokens outside
    ``token_mask`` ([T] bool) when given, are ignored; no host sync. Under ``torch.export`` the
    counts come from comparisons (a [T*k, E] one-hot sum): TOSA has no scatter_add."""
    if token_mask is not None:
        expert_ids = torch.where(token_mask.unsqueeze(1), expert_ids, -1)
    flat = expert_ids.reshape(-1).long()
    if torch.compiler.is_exporting():
        return (flat.unsqueeze(1) == torch.arange(num_experts, device=flat.device)).sum(0)
    return _counts_with_dropped(flat, num_experts)[1][:num_experts]


def mask_experts(expert_ids: Tensor, num_experts: int) -> Tensor:
    """``expert_ids`` with every id >= ``num_experts`` (a zero-computation expert) set to -1."""
    return expert_ids.masked_fill(expert_ids >= num_experts, -1)


def identity_experts(x: Tensor, weights: Tensor, expert_ids: Tensor, first: int, count: int,
                     token_mask: Tensor | None = None) -> Tensor:
    """``x[t] * sum_j weights[t, j]`` over the slots routed to an identity expert (ids ``first ..
    first + count - 1``); tokens outside ``token_mask`` (if given) get zero."""
    hit = (expert_ids >= first) & (expert_ids < first + count)
    if token_mask is not None:
        hit = hit & token_mask.unsqueeze(-1)
    share = torch.where(hit, weights, torch.zeros_like(weights)).sum(-1, keepdim=True)
    return x * share.to(x.dtype)


# --------------------------------------------------------------------------- losses


def load_balance_loss(probs: Tensor, expert_ids: Tensor, num_experts: int, counts: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` (fp32 scalar); ``counts``:
    ``expert_counts(expert_ids, num_experts)`` if already computed."""
    probs32 = _at_least_fp32(probs)
    if probs.shape[0] == 0:
        return probs32.sum() * 0.0
    counts = (expert_counts(expert_ids, num_experts) if counts is None else counts).to(probs32.dtype)
    frac = counts / counts.sum().clamp_min(1.0)
    mean_prob = probs32.mean(dim=0)
    return num_experts * (frac * mean_prob).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``mean(logsumexp(logits, -1)^2)`` (fp32 scalar); 0 when T == 0."""
    logits32 = _at_least_fp32(logits)
    if logits.shape[0] == 0:
        return logits32.sum() * 0.0
    return torch.logsumexp(logits32, dim=-1).square().mean()


# --------------------------------------------------------------------------- experts


def _activation(name: str, caller: str = "moe_experts"):
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "identity":
        return lambda t: t
    raise ValueError(f"{caller}: unknown activation {name!r}; expected one of {ACTIVATIONS}")


_GMM_PROBE: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True if ``torch._grouped_mm`` runs (fwd+bwd, correct results) for device/dtype. Cached."""
    device = torch.device(device)
    key = (device.type if device.index is None else f"{device.type}:{device.index}", dtype)
    if key not in _GMM_PROBE:
        try:
            _GMM_PROBE[key] = hasattr(torch, "_grouped_mm") and _grouped_mm_probe(device, dtype)
        except Exception:  # noqa: BLE001 - any failure means "not available"
            _GMM_PROBE[key] = False
    return _GMM_PROBE[key]


@torch.enable_grad()  # the probe runs a backward, also when the first caller is under no_grad
def _grouped_mm_probe(device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(3, 16, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    g = torch.randn(6, 16, generator=gen).to(device=device, dtype=dtype)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=device)
    out = torch._grouped_mm(a, b, offs=offs)
    (out * g).sum().backward()  # not backward(g): that imports sympy (~0.25 s, 40 MB)
    a64, b64, g64 = a.detach().double(), b.detach().double(), g.double()
    ref = torch.cat([a64[:2] @ b64[0], a64[2:] @ b64[2]])
    ref_ga = torch.cat([g64[:2] @ b64[0].T, g64[2:] @ b64[2].T])
    ref_gb = torch.stack([a64[:2].T @ g64[:2], torch.zeros(16, 16, dtype=torch.float64), a64[2:].T @ g64[2:]])
    tol = 1e-3 if dtype == torch.float32 else 0.1
    return bool(torch.allclose(out.double(), ref, rtol=tol, atol=tol * 16)
                and torch.allclose(a.grad.double(), ref_ga, rtol=tol, atol=tol * 16)
                and torch.allclose(b.grad.double(), ref_gb, rtol=tol, atol=tol * 16))


def _gmm_stride_ok(t: Tensor) -> bool:
    """Mirror of ATen's check_valid_strides_and_return_transposed for ``torch._grouped_mm``."""
    align = 16 // t.element_size()
    if t.device.type != "cpu" and t.data_ptr() % 16:
        return False
    s_row, s_col = t.stride(-2), t.stride(-1)
    if s_row == 1 and s_col >= max(1, t.shape[-2]):  # column-major (transposed) layout
        return s_col % align == 0
    if s_col == 1 and s_row >= max(1, t.shape[-1]):  # row-major layout
        return s_row % align == 0
    return False


def _grouped_mm_usable(
    x: Tensor, k: int, up_proj: Tensor, down_proj: Tensor, gate_proj: Tensor | None
) -> bool:
    mats = [up_proj, down_proj] + ([gate_proj] if gate_proj is not None else [])
    if any(m.dtype != x.dtype or m.device != x.device for m in mats):
        return False
    el = x.element_size()
    d, f = up_proj.shape[1], up_proj.shape[2]
    if (d * el) % 16 or (f * el) % 16:
        return False
    if x.shape[0] * max(k, 1) >= 2**31:  # offsets are int32
        return False
    if not all(_gmm_stride_ok(m) for m in mats):
        return False
    return _grouped_mm_runs(x.device, x.dtype)


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """``grouped_mm_available``, and traceable: while torch.compile / torch.export trace, its meta
    kernel takes bf16 only."""
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    return grouped_mm_available(device, dtype)


def _auto_wants_counts(x: Tensor) -> bool:
    """CPU + bf16/fp16: "auto" inspects the host-side counts to consider padded_bmm."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def resolve_method(
    method: str,
    x: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    gate_proj: Tensor | None = None,
    k: int = 1,
    counts: list[int] | None = None,
) -> str:
    """Concrete dispatch method that ``moe_experts`` runs for these operands."""
    if method not in METHODS:
        raise ValueError(f"moe_experts: unknown method {method!r}; expected one of {METHODS}")
    if method == "auto":
        E = up_proj.shape[0]
        if counts is not None and _auto_wants_counts(x):
            n_valid = sum(counts[:E])
            if n_valid > 0 and E * max(counts[:E]) <= _CPU_LOWP_PADDED_MAX_PAD_RATIO * n_valid:
                return "padded_bmm"
        method = "grouped_mm"
        if x.device.type == "cpu":
            rows_per_expert = x.shape[0] * k / max(E, 1)
            training = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, up_proj, down_proj, gate_proj))
            if training:
                row_bytes = max(up_proj.shape[1], up_proj.shape[2]) * x.element_size()
                grouped = x.shape[0] * k * row_bytes <= _CPU_GROUPED_MAX_ROWS_BYTES_TRAIN
            else:
                grouped = rows_per_expert <= _CPU_GROUPED_MAX_ROWS_FORWARD
            if not grouped:
                method = "split"
    if method == "grouped_mm" and not _grouped_mm_usable(x, k, up_proj, down_proj, gate_proj):
        return "split"
    return method


def _check_shapes(x, expert_ids, weights, up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias,
                  caller: str = "moe_experts"):
    """Shapes of an expert call's arguments; ValueError naming the caller otherwise."""
    if x.dim() != 2:
        raise ValueError(f"{caller}: x must be [T, d], got {tuple(x.shape)}")
    T, d = x.shape
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T:
        raise ValueError(f"{caller}: expert_ids must be [T={T}, k], got {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise ValueError(f"{caller}: expert_ids must be an integer tensor")
    if weights.shape != expert_ids.shape:
        raise ValueError(
            f"{caller}: weights {tuple(weights.shape)} != expert_ids {tuple(expert_ids.shape)}"
        )
    if up_proj.dim() != 3 or up_proj.shape[1] != d:
        raise ValueError(f"{caller}: up_proj must be [E, d={d}, f], got {tuple(up_proj.shape)}")
    E, _, f = up_proj.shape
    expected = {
        "down_proj": (down_proj, (E, f, d)),
        "gate_proj": (gate_proj, (E, d, f)),
        "up_bias": (up_bias, (E, f)),
        "gate_bias": (gate_bias, (E, f)),
        "down_bias": (down_bias, (E, d)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{caller}: {name} must be {list(shape)}, got {tuple(t.shape)}")
    if gate_bias is not None and gate_proj is None:
        raise ValueError(f"{caller}: gate_bias given without gate_proj")


def _ffn(xs, act, up, down, gate, ub, db, gb, mm):
    """Expert FFN on rows ``xs`` with a matmul function ``mm(a, w)``; biases already row-aligned."""
    u = mm(xs, up)
    if ub is not None:
        u = u + ub
    if gate is not None:
        g = mm(xs, gate)
        if gb is not None:
            g = g + gb
        h = act(g) * u
    else:
        h = act(u)
    y = mm(h, down)
    if db is not None:
        y = y + db
    return y


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast gives matrix products on x's device; None where autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _weighted_swiglu_rows(xs, row_w, up, down, gate, ub, db, gb, mm) -> Tensor:
    """``w * ((silu(xs gate + gb) * (xs up + ub)) down + db)`` per row, without gradients, with
    the SwiGLU and the routing weight as one compiled loop (``moec_cpu_fused``); the weight goes on
    the narrower side of the down GEMM. ``mm(a, w)`` multiplies rows by their expert's matrix."""
    u, g = mm(xs, up), mm(xs, gate)
    if ub is not None:
        u += ub
    if gb is not None:
        g += gb
    w = row_w.to(xs.dtype).unsqueeze(1)
    weight_first = down.shape[-1] > down.shape[-2]  # d > f
    y = mm(_cpu_fused.swiglu_forward(g, u, w, weighted=weight_first), down)
    if not weight_first:
        y.mul_(w)
    return y if db is None else y.addcmul_(db, w)


_ACT_BACKWARD = {  # d act(t) / dt applied to a gradient: (grad, t) -> grad of t
    "silu": torch.ops.aten.silu_backward,
    "gelu": lambda g, t: torch.ops.aten.gelu_backward(g, t),
    "gelu_tanh": lambda g, t: torch.ops.aten.gelu_backward(g, t, approximate="tanh"),
    "relu": lambda g, t: g * (t > 0).to(g.dtype),
    "identity": lambda g, t: g,
}


def _fresh(act, t: Tensor) -> Tensor:
    """``act(t)`` as a new tensor that may be updated in place (the identity returns ``t`` itself)."""
    out = act(t)
    return out.clone() if out is t else out


_STACK = ("up", "down", "gate", "up_bias", "down_bias", "gate_bias")  # the tensors of one weight stack


def _per_expert(tensors: tuple, stacks: tuple) -> list[tuple]:
    """``tensors`` laid out like the weight-stack arguments ``stacks`` of ``_SplitExperts`` (six
    per stack, `_STACK`; e.g. the stacks themselves or their gradients) as one tuple of views
    per global expert: (up, down, gate, up_bias, down_bias, gate_bias), None where absent. One
    ``unbind`` per tensor instead of a ``select`` per expert and use."""
    n = len(_STACK)
    experts = []
    for j in range(0, len(stacks), n):
        E = stacks[j].shape[0]
        experts += zip(*([None] * E if t is None else t.unbind(0) for t in tensors[j:j + n]))
    return experts


_GRAD_BUFFERS = WeakIdKeyDictionary()  # CPU stacked expert weight -> memory its gradient is written to
_GRAD_BUFFERS_LOCK = threading.Lock()
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private; without it, no reuse


def _weight_grad_buffer(weight: Tensor) -> Tensor:
    """An uninitialised tensor like ``weight`` to write its gradient into.

    For a CPU leaf (a parameter) the memory is kept from one backward to the next and reused
    once nothing else refers to it, i.e. once the previous step's gradient was dropped
    (``zero_grad()`` sets it to None) or added into ``weight.grad``. The returned tensor is a
    new alias of that memory, which autograd adopts as ``weight.grad``. Without this, a stacked
    [E, d, f] gradient is a fresh allocation every step, and glibc maps allocations of 32 MiB
    and more afresh each time: at E=64, d=512, f=256 that is ~8k page faults (5-8 ms) per
    weight and step. The cost: one gradient-sized buffer per stacked weight stays allocated
    between steps, as with ``zero_grad(set_to_none=False)``. Other devices have caching
    allocators and get a plain ``empty_like``."""
    plain = type(weight) in (Tensor, nn.Parameter)  # not a tensor subclass (e.g. a DTensor shard)
    if (not plain or _STORAGE_USE_COUNT is None or weight.device.type != "cpu" or not weight.is_leaf
            or torch.compiler.is_compiling()):
        return torch.empty_like(weight)
    with _GRAD_BUFFERS_LOCK:
        buf = _GRAD_BUFFERS.get(weight)
        # in use: 2 references are the buffer's own and the temporary storage object here
        if (buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype
                or buf.stride() != weight.stride()
                or _STORAGE_USE_COUNT(buf.untyped_storage()._cdata) > 2):
            buf = torch.empty_like(weight)
            _GRAD_BUFFERS[weight] = buf
        return buf.detach()


def free_gradient_buffers() -> None:
    """Drop the weight-gradient memory the split path keeps between steps (``_weight_grad_buffer``);
    gradients that still refer to it stay valid. The next backward allocates it again."""
    with _GRAD_BUFFERS_LOCK:
        _GRAD_BUFFERS.clear()


def _fused_swiglu(act_name: str, x: Tensor, stacks: tuple) -> bool:
    """Whether the split path runs its SwiGLU epilogue (forward and backward) as one compiled
    loop per expert (``moec_cpu_fused``) instead of separate torch ops."""
    gates = stacks[2::len(_STACK)]
    return (act_name == "silu" and x.device.type == "cpu" and all(g is not None for g in gates)
            and all(t is None or t.dtype == x.dtype for t in stacks) and not torch.compiler.is_compiling()
            and _cpu_fused.available(x.dtype))


def _hidden(act_name: str, fused: bool, g: Tensor | None, u: Tensor, w: Tensor, weight_first: bool) -> Tensor:
    """The hidden rows ``act(g) * u`` (or ``act(u)`` without a gate), times the routing weight
    ``w`` [n, 1] if ``weight_first``; one compiled loop when ``fused`` (``_fused_swiglu``)."""
    if fused:
        return _cpu_fused.swiglu_forward(g, u, w, weighted=weight_first)
    h = _fresh(_activation(act_name), g if g is not None else u)
    if g is not None:
        h.mul_(u)
    return h.mul_(w) if weight_first else h


def _hidden_backward(act_name: str, fused: bool, dhw: Tensor, g: Tensor | None, u: Tensor, w: Tensor,
                     dw: Tensor | None, weight_first: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Backward of ``_hidden`` and of the routing weight, given ``dhw = dy @ down^T`` for the
    down GEMM's input ``h w`` (the weight applied to h, or to h @ down: the same gradient).
    Returns ``(hw, du, dg)``: the rows the down gradient multiplies (``h w`` if ``weight_first``
    else ``h``), and the gradients of the up and gate pre-activations; writes ``dw[i] = <dhw_i,
    h_i>`` (``dw`` may be None). Uses up ``dhw``, ``g`` and ``u`` in place: the hidden rows are
    recomputed from them instead of kept from the forward."""
    if fused:  # one loop: dhw <- h (times w if weight_first), u <- du, g <- dg, and d w
        _cpu_fused.swiglu_backward_(dhw, g, u, w, dw, weighted=weight_first)
        return dhw, u, g
    a = _fresh(_activation(act_name), g if g is not None else u)
    h = a * u if g is not None else a
    if dw is not None:
        dw.copy_(torch.linalg.vecdot(dhw, h))
    dh = dhw.mul_(w)
    if g is not None:
        du = a.mul_(dh)
        dg = _ACT_BACKWARD[act_name](dh.mul_(u), g)
    else:
        du, dg = _ACT_BACKWARD[act_name](dh, u), None
    return (h.mul_(w) if weight_first else h), du, dg


class _SplitExperts(torch.autograd.Function):
    """The split path as one autograd node. Forward, per expert: gather its token rows, up (and
    gate) GEMM, activation, routing weight, down GEMM, index_add into the output. It keeps the
    rows and the pre-activations per expert; backward recomputes the activation and the hidden
    rows (a few elementwise passes over data that is in cache) instead of keeping them, which
    halves the memory held between forward and backward. Backward runs the six GEMMs per expert
    and writes the stacked weight gradients directly (no per-expert autograd graph, no stack/cat
    of gradients). Per-expert views (rows, weights, weight matrices) are made once per call by
    ``split`` / ``unbind``, so the per-expert loop runs only the ops that do the work. With SwiGLU
    experts on the CPU the elementwise work between the GEMMs is one compiled loop per expert and
    direction (``_fused_swiglu``).

    The experts may come from several weight stacks (modality groups run in one call): the
    trailing arguments are the stacks' tensors, six per stack (`_STACK`), and global expert ids
    run through the stacks in order."""

    @staticmethod
    def forward(ctx, x, row_w, tok, sizes, act_name, acc_dtype, train, *stacks):
        _activation(act_name)
        experts = _per_expert(stacks, stacks)
        T, d, f = x.shape[0], x.shape[1], stacks[0].shape[2]
        weight_first = d > f  # the routing weight goes on the narrower side of the down GEMM
        out = torch.zeros(T, d, dtype=acc_dtype, device=x.device)
        keep = train and any(ctx.needs_input_grad)  # save what backward needs only when it will run
        fused = _fused_swiglu(act_name, x, stacks)
        toks = tok.split(sizes)
        ws = row_w.to(x.dtype).unsqueeze(1).split(sizes)
        saved = []  # per expert segment: rows and pre-activations (backward recomputes the rest)
        for e, n in enumerate(sizes[:len(experts)]):
            if not n:
                continue
            up, down, gate, ub, db, gb = experts[e]
            xe = x.index_select(0, toks[e])
            u = xe @ up
            if ub is not None:
                u += ub
            g = None
            if gate is not None:
                g = xe @ gate
                if gb is not None:
                    g += gb
            w = ws[e]
            h = _hidden(act_name, fused, g, u, w, weight_first)
            y = h @ down if weight_first else (h @ down).mul_(w)
            if db is not None:
                y += w * db
            out.index_add_(0, toks[e], y if y.dtype == acc_dtype else y.to(acc_dtype))
            if keep:
                saved.append((xe, u, g))
        if keep:
            ctx.save_for_backward(row_w, tok, *stacks)
            ctx.segments, ctx.sizes, ctx.act_name, ctx.x_shape = saved, sizes, act_name, (T, d)
            ctx.fused = fused
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        row_w, tok, *stacks = ctx.saved_tensors
        n_stack = len(_STACK)
        experts = _per_expert(stacks, stacks)
        need_x, need_w = ctx.needs_input_grad[:2]
        need = ctx.needs_input_grad[7:]  # per stack tensor, in `stacks` order
        sizes = ctx.sizes
        dtype = stacks[0].dtype
        weight_first = stacks[1].shape[2] > stacks[0].shape[2]  # d > f, as in forward
        dout = dout.to(dtype)

        # stacked weight gradients: experts without rows get zeros, the others are written whole
        grads = []
        for j, t in enumerate(stacks):
            if t is None or not need[j]:
                grads.append(None)
                continue
            first = sum(stacks[i].shape[0] for i in range(0, j - j % n_stack, n_stack))
            grad = _weight_grad_buffer(t)
            for local in range(t.shape[0]):
                if not sizes[first + local]:
                    grad[local].zero_()
            grads.append(grad)
        expert_grads = _per_expert(tuple(grads), stacks)
        dx = torch.zeros(ctx.x_shape, dtype=dtype, device=dout.device) if need_x else None
        dw = torch.zeros_like(row_w) if need_w else None
        dws = dw.split(sizes) if dw is not None else None
        toks = tok.split(sizes)
        ws = row_w.to(dtype).unsqueeze(1).split(sizes)
        if ctx.segments is None:
            raise RuntimeError("moe_experts (split path): backward ran twice through the same graph; "
                               "its saved rows were freed after the first backward (retain_graph=True "
                               "is not supported on this path)")
        segments = iter(ctx.segments)
        for e, n in enumerate(sizes[:len(experts)]):
            if not n:
                continue
            xe, u, g = next(segments)
            up, down, gate, _, db, _ = experts[e]
            gup, gdown, ggate, gub, gdb, ggb = expert_grads[e]
            w = ws[e]
            dy = dout.index_select(0, toks[e])
            # d down = (h w)^T dy with the routing weight on the narrower side; d w = <dhw, h> per row
            hw, du, dg = _hidden_backward(ctx.act_name, ctx.fused, dy @ down.t(), g, u, w,
                                          None if dws is None else dws[e], weight_first)
            if gdown is not None:
                torch.mm(hw.t(), dy if weight_first else dy * w, out=gdown)
            if dws is not None and db is not None:
                dws[e].add_(dy @ db)
            if gdb is not None:
                torch.sum(dy * w, 0, out=gdb)
            if gup is not None:
                torch.mm(xe.t(), du, out=gup)
            if gub is not None:
                torch.sum(du, 0, out=gub)
            if dg is not None and ggate is not None:
                torch.mm(xe.t(), dg, out=ggate)
            if dg is not None and ggb is not None:
                torch.sum(dg, 0, out=ggb)
            if dx is not None:
                dxe = du @ up.t()
                if dg is not None:
                    dxe.addmm_(dg, gate.t())
                dx.index_add_(0, toks[e], dxe)
        ctx.segments = None
        return (dx, dw, None, None, None, None, None, *grads)


class _GroupedExperts(torch.autograd.Function):
    """The grouped_mm path on the CPU when a backward will run. The token rows are gathered once,
    sorted by expert; the up, gate and down projections and their input gradients run as
    ``torch._grouped_mm`` over the stacked weights (a C++ loop over the experts, where split
    loops in Python), the elementwise part as ``_hidden`` / ``_hidden_backward``. The stacked
    weight gradients are written one expert at a time by ``mm(out=)`` into memory kept between
    steps (``_weight_grad_buffer``): ``torch._grouped_mm``'s own backward allocates them afresh
    every step, and on the CPU that costs a page fault per 4 KiB. Needs the segment sizes on the
    host (one sync). Keeps the gathered rows and the pre-activations for backward, as split does
    (``train``: only when a backward will run; ``moe_experts_groups`` runs its forward alone here
    too). Like ``_SplitExperts`` it takes one or more weight stacks (six tensors each, `_STACK`), global
    expert ids running through them in order: one grouped GEMM chain per stack."""

    @staticmethod
    def forward(ctx, x, row_w, tok, sizes, act_name, acc_dtype, train, *stacks):
        T, d = x.shape
        out = torch.zeros(T, d, dtype=acc_dtype, device=x.device)
        fused = _fused_swiglu(act_name, x, stacks)
        keep = train and any(ctx.needs_input_grad)  # save what backward needs only when it will run
        saved = []  # per stack: its rows' offsets, experts and the tensors backward needs, or None
        for (up, down, gate, ub, db, gb), rows, seg in _stack_segments(stacks, sizes):
            if rows is None:
                saved.append(None)
                continue
            E, f = up.shape[0], up.shape[2]
            t, w = tok[rows], row_w[rows].to(x.dtype).unsqueeze(1)
            offs = torch.tensor(seg, dtype=torch.int64).cumsum(0).to(device=x.device, dtype=torch.int32)
            row_e = None  # each row's expert, to align the biases
            if ub is not None or db is not None or gb is not None:
                row_e = torch.repeat_interleave(torch.arange(E, device=x.device), torch.tensor(seg, device=x.device),
                                                output_size=t.shape[0])
            xs = x.index_select(0, t)
            u = torch._grouped_mm(xs, up, offs=offs)
            if ub is not None:
                u += ub.index_select(0, row_e)
            g = None
            if gate is not None:
                g = torch._grouped_mm(xs, gate, offs=offs)
                if gb is not None:
                    g += gb.index_select(0, row_e)
            weight_first = d > f  # the routing weight goes on the narrower side of the down GEMM
            y = torch._grouped_mm(_hidden(act_name, fused, g, u, w, weight_first), down, offs=offs)
            if not weight_first:
                y.mul_(w)
            if db is not None:
                y.addcmul_(db.index_select(0, row_e), w)
            out.index_add_(0, t, y if y.dtype == acc_dtype else y.to(acc_dtype))
            saved.append((xs, u, g, offs, row_e) if keep else None)
        if keep:
            ctx.save_for_backward(row_w, tok, *stacks)
            ctx.rows, ctx.sizes, ctx.act_name, ctx.fused, ctx.x_shape = saved, sizes, act_name, fused, (T, d)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        row_w, tok, *stacks = ctx.saved_tensors
        if ctx.rows is None:
            raise RuntimeError("moe_experts (grouped_mm path): backward ran twice through the same graph; its "
                               "saved rows were freed after the first backward (retain_graph=True is not "
                               "supported on this path)")
        saved, ctx.rows = ctx.rows, None
        need_x, need_w, need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[7:]
        dtype = stacks[0].dtype
        dout = dout.to(dtype)
        dx = torch.zeros(ctx.x_shape, dtype=dtype, device=dout.device) if need_x else None
        dw = torch.zeros_like(row_w) if need_w else None
        grads = []
        for j, (stack, rows, seg) in enumerate(_stack_segments(stacks, ctx.sizes)):
            up, down, gate, ub, db, gb = stack
            wanted = [t is not None and need[len(_STACK) * j + i] for i, t in enumerate(stack)]
            if rows is None:  # no rows in this stack: zero gradients
                grads += [_weight_grad_buffer(t).zero_() if ok and i < 3 else torch.zeros_like(t) if ok else None
                          for i, (t, ok) in enumerate(zip(stack, wanted))]
                continue
            (xs, u, g, offs, row_e), saved[j] = saved[j], None  # freed as the backward goes
            t, w = tok[rows], row_w[rows].to(dtype).unsqueeze(1)
            weight_first = up.shape[1] > up.shape[2]
            dy = dout.index_select(0, t)
            hw, du, dg = _hidden_backward(ctx.act_name, ctx.fused, torch._grouped_mm(dy, down.transpose(1, 2), offs=offs),
                                          g, u, w, None if dw is None else dw[rows], weight_first)
            del u, g
            if dw is not None and db is not None:
                dw[rows] += torch.linalg.vecdot(dy, db.index_select(0, row_e))
            bias_grads = [torch.zeros_like(bias).index_add_(0, row_e, r) if ok else None
                          for bias, ok, r in ((ub, wanted[3], du), (db, wanted[4], dy * w if wanted[4] else None),
                                              (gb, wanted[5], dg))]
            # the inputs of each GEMM freed once used: a smaller peak than keeping them to the end
            grad_down = _stacked_weight_grad(down, wanted[1], hw if weight_first else hw.mul_(w), dy, seg)
            del hw, dy
            grad_up = _stacked_weight_grad(up, wanted[0], xs, du, seg)
            grad_gate = _stacked_weight_grad(gate, wanted[2], xs, dg, seg)
            del xs
            grads += [grad_up, grad_down, grad_gate, *bias_grads]
            if dx is not None:  # d x, one projection at a time (no second [rows, d] buffer)
                dx.index_add_(0, t, torch._grouped_mm(du, up.transpose(1, 2), offs=offs))
                del du
                if dg is not None:
                    dx.index_add_(0, t, torch._grouped_mm(dg, gate.transpose(1, 2), offs=offs))
        return (dx, dw, None, None, None, None, None, *grads)


def _stacked_weight_grad(weight: Tensor | None, wanted: bool, a: Tensor, b: Tensor, seg: list[int]) -> Tensor | None:
    """The gradient of a stacked weight, ``a_e^T b_e`` over each expert's rows, written one expert
    at a time into the memory kept for it between steps (zeros for an expert without rows)."""
    if weight is None or not wanted:
        return None
    grad = _weight_grad_buffer(weight)
    for ge, ae, be, m in zip(grad.unbind(0), a.split(seg), b.split(seg), seg):
        torch.mm(ae.t(), be, out=ge) if m else ge.zero_()
    return grad


def _stack_segments(stacks: tuple, sizes: list[int]):
    """Per weight stack (six tensors each, `_STACK`): the stack, the slice of its rows among the
    rows sorted by global expert id (None if it has none) and its experts' segment sizes."""
    n_stack = len(_STACK)
    start = first = 0
    for j in range(0, len(stacks), n_stack):
        E = stacks[j].shape[0]
        seg = sizes[first:first + E]
        first += E
        n = sum(seg)
        yield tuple(stacks[j:j + n_stack]), (slice(start, start + n) if n else None), seg
        start += n


def moe_experts(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    gate_proj: Tensor | None = None,
    activation: str = "silu",
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    gate_bias: Tensor | None = None,
    method: str = "auto",
    order: Tensor | None = None,
    offsets: Tensor | None = None,
) -> Tensor:
    """Weighted mixture of expert FFNs; see the module docstring for the full contract.

    ``order`` / ``offsets`` (from ``permute``) reuse a sort already done (dropped slots last)."""
    _check_shapes(x, expert_ids, weights, up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias)
    cast = _autocast_dtype(x)
    if cast is not None:  # the expert GEMMs in autocast's dtype, as F.linear would run them
        with torch.autocast(x.device.type, enabled=False):
            return moe_experts(x.to(cast), expert_ids, weights,
                               *(None if t is None else t.to(cast) for t in (up_proj, down_proj, gate_proj)),
                               activation, *(None if t is None else t.to(cast) for t in (up_bias, down_bias, gate_bias)),
                               method, order, offsets)
    act = _activation(activation)
    T, d = x.shape
    k = expert_ids.shape[1]
    E = up_proj.shape[0]
    N = T * k

    # Sort the flat (token, slot) pairs by expert; dropped slots (-1) go last (bin E).
    flat_ids = expert_ids.reshape(-1).long()
    key = None  # sort key (dropped slots -> bin E); the split path never needs it when sorted already
    if order is not None and offsets is not None:
        counts = torch.cat([offsets.diff(), (N - offsets[-1]).reshape(1)])
    else:
        key, counts = _counts_with_dropped(flat_ids, E)
        order = torch.argsort(key, stable=True)
    sizes = None  # host copy of counts: fetched at most once per call (the only host sync)
    if method == "auto" and _auto_wants_counts(x):
        sizes = counts.tolist()
    method = resolve_method(method, x, up_proj, down_proj, gate_proj, k=k, counts=sizes)
    if method in ("split", "padded_bmm") and sizes is None:
        sizes = counts.tolist()
    tok = torch.div(order, k, rounding_mode="floor") if k > 0 else order
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 combine for bf16/fp16, fp64 stays fp64
    row_w = weights.reshape(-1).index_select(0, order).to(acc_dtype)
    if method == "split":  # dropped slots sort past every expert's segment: never read, zero gradient
        out = _SplitExperts.apply(x, row_w, tok, sizes, activation, acc_dtype, torch.is_grad_enabled(),
                                  up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias)
        return out.to(x.dtype)
    stacks = (up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias)
    if method == "grouped_mm" and x.device.type == "cpu" and _needs_grad(x, weights, *stacks):
        out = _GroupedExperts.apply(x, row_w, tok, counts.tolist() if sizes is None else sizes, activation,
                                    acc_dtype, True, *stacks)
        return out.to(x.dtype)
    if key is None:
        key = torch.where(flat_ids < 0, torch.full_like(flat_ids, E), flat_ids)
    sorted_key = key.index_select(0, order)
    valid = sorted_key < E
    row_w = torch.where(valid, row_w, torch.zeros_like(row_w))  # dropped slot -> weight 0, zero grad
    xs = x.index_select(0, tok)  # gather token rows once
    contrib = None  # the weighted expert outputs, where a path computes them weighted

    if method == "grouped_mm":
        # Dropped rows (sorted last) are appended to the last expert's group so that every
        # output row is written (rows beyond offs[-1] would be uninitialised); their weight is 0.
        offs = counts[:E].cumsum(0).to(torch.int32)
        offs[-1] = N
        row_e = sorted_key.clamp(max=E - 1)
        row_biases = [None if b is None else b.index_select(0, row_e) for b in stacks[3:]]
        grouped = lambda a, w: torch._grouped_mm(a, w, offs=offs)
        if _fused_swiglu(activation, x, stacks) and not _needs_grad(x, weights, *stacks):
            contrib = _weighted_swiglu_rows(xs, row_w, *stacks[:3], *row_biases, grouped)  # weighted already
        else:
            ys = _ffn(xs, act, up_proj, down_proj, gate_proj, *row_biases, grouped)
    elif method == "padded_bmm":
        C = max(max(sizes[:E]), 1)  # C >= 1 so that row 0 exists for dropped rows to point at
        starts = counts.cumsum(0) - counts
        pos = torch.arange(N, device=x.device) - starts.index_select(0, sorted_key)
        slot = sorted_key * C + pos
        dump = torch.full_like(slot, E * C)  # dropped rows are written to a spare row
        slot_in = torch.where(valid, slot, dump)
        buf = x.new_zeros(E * C + 1, d).index_copy(0, slot_in, xs)
        xp = buf[: E * C].view(E, C, d)
        yp = _ffn(
            xp,
            act,
            up_proj,
            down_proj,
            gate_proj,
            None if up_bias is None else up_bias.unsqueeze(1),
            None if down_bias is None else down_bias.unsqueeze(1),
            None if gate_bias is None else gate_bias.unsqueeze(1),
            torch.bmm,
        )
        slot_out = torch.where(valid, slot, torch.zeros_like(slot))  # dropped: any row, weight 0
        ys = yp.reshape(E * C, d).index_select(0, slot_out)
    else:  # pragma: no cover - resolve_method guarantees one of the above
        raise AssertionError(method)

    if contrib is None:
        contrib = ys.to(acc_dtype) * row_w.unsqueeze(1)  # routing weight multiplied in before the combine
    out = torch.zeros(T, d, dtype=acc_dtype, device=x.device)
    out.index_add_(0, tok, contrib)
    return out.to(x.dtype)


class _ExpertSegments:
    """Rows sorted by expert, ``counts[e]`` rows for expert e (a device tensor). ``matmul(rows,
    weight)`` multiplies segment e by ``weight[e]`` ([E, in, out]): ``torch._grouped_mm`` where it
    runs (no host sync), else one ``mm`` per expert with the segment sizes fetched once for all
    calls (one host sync). Rows past the last segment (dropped slots) go with the last expert."""

    def __init__(self, counts: Tensor, num_experts: int):
        self.counts, self.sizes = counts[:num_experts], None

    def matmul(self, rows: Tensor, weight: Tensor) -> Tensor:
        el = rows.element_size()
        aligned = (weight.shape[1] * el) % 16 == 0 and (weight.shape[2] * el) % 16 == 0 and _gmm_stride_ok(weight)
        if (aligned and rows.dtype == weight.dtype and rows.device == weight.device and 0 < rows.shape[0] < 2**31
                and _grouped_mm_runs(rows.device, rows.dtype)):
            offs = self.counts.cumsum(0).to(torch.int32)
            offs[-1] = rows.shape[0]
            return torch._grouped_mm(rows, weight, offs=offs)
        if self.sizes is None:
            self.sizes = self.counts.tolist()  # host sync: the segment sizes
        sizes = [*self.sizes[:-1], rows.shape[0] - sum(self.sizes[:-1])]
        return torch.cat([seg @ w for seg, w in zip(rows.split(sizes), weight.unbind(0))])


def moe_lora_experts(x: Tensor, expert_ids: Tensor, weights: Tensor, experts: LoRAExperts,
                     activation: str = "silu", order: Tensor | None = None,
                     offsets: Tensor | None = None) -> Tensor:
    """``moe_experts`` for LoRA experts (``LoRAExperts``) without merging their weights: with
    ``W_e = W0 + s A_e B_e``, ``rows @ W_e = rows @ W0 + s (rows @ A_e) @ B_e``. The frozen base
    runs as dense GEMMs (up and gate once per token, not once per (token, slot)), the adapters as
    rank-r grouped GEMMs over the rows sorted by expert. The merged [E, in, out] weights are
    never built (E x in x out FLOPs and memory per matrix and call). ``order`` / ``offsets``
    (from ``permute``) reuse a sort already done; at most one host sync (none with a native
    ``torch._grouped_mm``)."""
    base = experts.base
    _check_shapes(x, expert_ids, weights, base.up_proj, base.down_proj, None, None, None, None,
                  caller="moe_lora_experts")
    act = _activation(activation, "moe_lora_experts")
    T, k, E = x.shape[0], expert_ids.shape[1], experts.num_experts
    flat_ids = expert_ids.reshape(-1).long()
    if order is not None and offsets is not None:
        counts = torch.cat([offsets.diff(), (T * k - offsets[-1]).reshape(1)])
    else:
        key, counts = _counts_with_dropped(flat_ids, E)
        order = torch.argsort(key, stable=True)
    tok = torch.div(order, k, rounding_mode="floor") if k > 0 else order
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    valid = flat_ids.index_select(0, order) >= 0
    row_w = torch.where(valid, weights.reshape(-1).index_select(0, order), 0).to(acc_dtype)  # dropped: 0
    segments = _ExpertSegments(counts, E)

    def project(name: str, tokens: Tensor | None, rows: Tensor) -> Tensor:
        """Projection `name` of the sorted rows; the base part from per-token inputs if given."""
        w0, b0 = getattr(base, f"{name}_proj")[0], getattr(base, f"{name}_bias")
        out = (tokens @ w0).index_select(0, tok) if tokens is not None else rows @ w0
        if b0 is not None:
            out += b0[0]
        if name in experts.adapted:
            a, b = getattr(experts, f"{name}_lora_a"), getattr(experts, f"{name}_lora_b")
            out.add_(segments.matmul(segments.matmul(rows, a), b), alpha=experts.scale)
        return out

    xs = x.index_select(0, tok)
    u = project("up", x, xs)
    h = act(project("gate", x, xs)) * u if experts.glu else act(u)
    y = project("down", None, h)
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    out.index_add_(0, tok, y.to(acc_dtype) * row_w.unsqueeze(1))
    return out.to(x.dtype)


def router_logits(x: Tensor, routers: list[nn.Linear]) -> tuple[Tensor, ...]:
    """The logits of bias-free linear routers that read the same rows (the routers of modality
    groups, each scoring every token), from one GEMM over their stacked weights; one [T, E_i]
    view per router. Against one GEMM per router this saves, per extra router, a forward GEMM,
    two backward GEMMs and the [T, d] gradient sum (measured at T = 1024, d = 512, two routers
    of 4: 0.96 -> 0.39 ms forward+backward)."""
    weight = torch.cat([r.weight for r in routers])
    return F.linear(x, weight).split([r.out_features for r in routers], dim=-1)


def merge_group_routing(ids: list[Tensor], weights: list[Tensor], masks: list[Tensor],
                        offsets: list[int]) -> tuple[Tensor, Tensor]:
    """The routings of modality groups that partition the tokens (each group routed over every
    token) as one routing in a shared expert-id space: a token keeps the slots of the group whose
    mask selects it, ids shifted by that group's offset; a token no group selects gets -1 / 0.
    Slots are padded to the largest k with -1 / 0."""
    k = max(i.shape[1] for i in ids)
    merged_ids = torch.full((ids[0].shape[0], k), -1, dtype=torch.int64, device=ids[0].device)
    merged_w = torch.zeros((ids[0].shape[0], k), dtype=weights[0].dtype, device=ids[0].device)
    for i, w, mask, off in zip(ids, weights, masks, offsets):
        shifted = torch.where(i >= 0, i.long() + off, -1) if off else i.long()
        if i.shape[1] < k:
            shifted, w = F.pad(shifted, (0, k - i.shape[1]), value=-1), F.pad(w, (0, k - i.shape[1]))
        selects = mask.unsqueeze(1)
        merged_ids = torch.where(selects, shifted, merged_ids)
        merged_w = torch.where(selects, w.to(merged_w.dtype), merged_w)
    return merged_ids, merged_w


def moe_experts_groups(x: Tensor, expert_ids: Tensor, weights: Tensor, stacks: list[tuple],
                       activation: str = "silu") -> Tensor:
    """``moe_experts`` over the experts of several groups in one call: ``stacks`` holds each
    group's ``(up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias)`` (None where absent)
    and ``expert_ids`` run through the groups' experts in order (``merge_group_routing``). On the
    CPU the grouped path (where "auto" picks grouped_mm for every stack) or the split path reads
    every group's weights where they are (one host sync for the whole layer); elsewhere the
    stacks are concatenated for the grouped GEMM."""
    stacks = [tuple(st) + (None,) * (len(_STACK) - len(st)) for st in stacks]
    cast = _autocast_dtype(x)
    if cast is not None:  # the expert GEMMs in autocast's dtype, as F.linear would run them
        with torch.autocast(x.device.type, enabled=False):
            return moe_experts_groups(x.to(cast), expert_ids, weights,
                                      [tuple(None if t is None else t.to(cast) for t in st) for st in stacks], activation)
    if x.device.type != "cpu":
        cat = [None if st[0] is None else torch.cat(list(st)) for st in zip(*stacks)]
        return moe_experts(x, expert_ids, weights, cat[0], cat[1], gate_proj=cat[2], activation=activation,
                           up_bias=cat[3], down_bias=cat[4], gate_bias=cat[5])
    for st in stacks:
        _check_shapes(x, expert_ids, weights, *st[:3], st[3], st[4], st[5], caller="moe_experts_groups")
    _activation(activation, "moe_experts_groups")
    E = sum(st[0].shape[0] for st in stacks)
    k = expert_ids.shape[1]
    key, counts = _counts_with_dropped(expert_ids.reshape(-1).long(), E)
    sizes = counts.tolist()  # host sync: the expert segment sizes
    order = torch.argsort(key, stable=True)
    tok = torch.div(order, k, rounding_mode="floor") if k > 0 else order
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    row_w = weights.reshape(-1).index_select(0, order).to(acc_dtype)  # dropped slots: past every segment
    flat = [t for st in stacks for t in st]
    train = torch.is_grad_enabled()
    experts = _GroupedExperts if _grouped_per_stack(x, weights, stacks, flat, sizes, k, activation) else _SplitExperts
    return experts.apply(x, row_w, tok, sizes, activation, acc_dtype, train, *flat).to(x.dtype)


def _grouped_per_stack(x, weights, stacks, flat, sizes, k, activation) -> bool:
    """Whether ``moe_experts_groups`` runs ``_GroupedExperts`` (one grouped GEMM chain per weight
    stack) rather than split: when a backward will run, where "auto" picks grouped_mm for every
    stack; for a forward alone, with the compiled SwiGLU epilogue, where every stack has at most
    ``_CPU_GROUPED_MAX_ROWS_FORWARD`` rows per expert of its own (where grouped_mm saves split's
    per-expert dispatch). ``flat``: the stacks' tensors in one list."""
    if _needs_grad(x, weights, *flat):
        return all(resolve_method("auto", x, *st[:3], k=k) == "grouped_mm" for st in stacks)
    if not _fused_swiglu(activation, x, tuple(flat)):
        return False
    return all(_grouped_mm_usable(x, k, *st[:3])
               and (rows is None or rows.stop - rows.start <= _CPU_GROUPED_MAX_ROWS_FORWARD * len(seg))
               for st, rows, seg in _stack_segments(tuple(flat), sizes))


# ---- unfused primitives (one per IR op of an unfused MoE lowering) ---------------------------------
def sort_by_expert(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Flat indices of the (token, slot) pairs ordered by expert id, stable within an expert;
    dropped slots (id -1) come last."""
    flat = expert_ids.reshape(-1)
    return torch.argsort(torch.where(flat < 0, torch.full_like(flat, num_experts), flat), stable=True)


def expert_offsets(counts: Tensor) -> Tensor:
    """[E + 1] start of each expert's segment in the sorted rows; the last entry is the total."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def permute(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """sort_by_expert, expert_counts and expert_offsets at once: (order, counts, offsets)."""
    counts = expert_counts(expert_ids, num_experts)
    return sort_by_expert(expert_ids, num_experts), counts, expert_offsets(counts)


def gather_rows(x: Tensor, order: Tensor, k: int) -> Tensor:
    """The permuted copy of the token rows: row i is x[order[i] // k]."""
    return x.index_select(0, torch.div(order, k, rounding_mode="floor"))


def grouped_linear(rows: Tensor, weight: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """Segment e of `rows` (offsets[e]:offsets[e+1]) times weight[e] (+ bias[e]); one host sync.

    Rows past offsets[-1] (dropped slots) give zero rows. Empty segments cost nothing; with no
    routed rows expert 0 runs on an empty slice, so the weights stay in the autograd graph."""
    sizes = offsets.diff().tolist()
    dropped = rows.shape[0] - sum(sizes)
    parts = []
    segments = torch.split(rows, [*sizes, dropped])
    for e, (segment, w) in enumerate(zip(segments, weight.unbind(0))):
        if sizes[e] or (e == 0 and sum(sizes) == 0):
            out = segment @ w
            parts.append(out + bias[e] if bias is not None else out)
    if dropped:
        parts.append(rows.new_zeros(dropped, weight.shape[-1]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def activate(h: Tensor, activation: str, gate: Tensor | None = None) -> Tensor:
    """act(h), or act(gate) * h for a GLU."""
    act = _activation(activation)
    return act(gate) * h if gate is not None else act(h)


def combine(rows: Tensor, weights: Tensor, order: Tensor) -> Tensor:
    """Sorted expert outputs times their routing weights, summed back into token order."""
    T, k = weights.shape
    acc = torch.promote_types(rows.dtype, torch.float32)
    w = weights.reshape(-1).index_select(0, order).to(acc)
    out = torch.zeros(T, rows.shape[-1], dtype=acc, device=rows.device)
    out.index_add_(0, torch.div(order, k, rounding_mode="floor"), rows.to(acc) * w.unsqueeze(1))
    return out.to(rows.dtype)


# ---- layers and helpers used by generated model files ------------------------------------------
@dataclass
class ModelOutput:
    """What a generated model returns: `output` (same shape as x), `aux_loss` (weighted sum of the
    declared loss terms, a scalar), `expert_counts` (tokens routed to each expert, one tensor per
    MoE layer, expert groups concatenated in declaration order)."""

    output: Tensor
    aux_loss: Tensor
    expert_counts: list


torch.export.register_dataclass(ModelOutput, serialized_type_name="moec_runtime.ModelOutput")


class Container(nn.Module):
    """A plain namespace of submodules, so parameter names follow the .moe structure."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


def check_modality(x: Tensor, modality: Tensor | None, num_modalities: int, d_model: int,
                   dtype: torch.dtype | None = None, check_ids: bool = True) -> Tensor:
    """Validate the model inputs; a missing `modality` is allowed when one modality is declared.
    ``x`` must have the parameters' `dtype` unless autocast is on. With `check_ids`, modality ids
    outside [0, num_modalities) are an error: one host sync, skipped while torch.compile or
    torch.export traces the model."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        what = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor of shape [..., {d_model}], got {what}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x is {x.dtype} but the model's parameters are {dtype}: convert one of them "
                        f"(x.to({dtype}) or model.to({x.dtype})), or run under torch.autocast")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [..., {d_model}], got {tuple(x.shape)}")
    if modality is None:
        if num_modalities != 1:
            raise ValueError(f"this model declares {num_modalities} modalities: pass `modality`, an integer "
                             f"tensor of shape {tuple(x.shape[:-1])}")
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    if not isinstance(modality, Tensor) or modality.dtype.is_floating_point or modality.dtype == torch.bool:
        raise ValueError("modality must be an integer tensor")
    if tuple(modality.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"modality must have shape {tuple(x.shape[:-1])}, got {tuple(modality.shape)}")
    modality = modality.to(device=x.device, dtype=torch.long)
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if check_ids and not tracing and modality.numel() and bool(((modality < 0) | (modality >= num_modalities)).any()):
        bad = modality[(modality < 0) | (modality >= num_modalities)]
        raise ValueError(f"modality ids must lie in [0, {num_modalities}) (the declared modalities, in order); "
                         f"got {sorted(set(bad.tolist()))[:5]}")
    return modality


def select_tokens(modality: Tensor, modalities: tuple) -> Tensor:
    """Indices of the tokens whose modality is in `modalities` (one host sync: the count)."""
    if len(modalities) == 1:
        mask = modality == modalities[0]
    else:
        mask = torch.isin(modality, torch.tensor(modalities, device=modality.device))
    return mask.nonzero().squeeze(1)


def scatter_tokens(y: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """A tensor shaped like `like`, zero except rows `index`, which hold `y`."""
    return torch.zeros_like(like, dtype=y.dtype).index_copy_(0, index, y)  # in place: no copy of the zeros


def ternarize(weight: Tensor) -> Tensor:
    """{-1, 0, 1} x scale, scale = mean |w| per expert (dim 0 of a stacked [E, in, out] weight; the
    whole matrix for a 2-D one), as BitNet b1.58's absmean quantiser; gradients pass straight
    through to the full-precision weight (straight-through estimator)."""
    dims = tuple(range(1, weight.dim())) if weight.dim() == 3 else tuple(range(weight.dim()))
    scale = weight.abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    quantised = torch.clamp(torch.round(weight / scale), -1, 1) * scale
    return weight + (quantised - weight).detach()


_NORM_CHUNK_ELEMENTS = 1 << 17  # rows per backward chunk of RMSNorm: ~512 KiB of fp32, stays in cache


class _RMSNormRows(torch.autograd.Function):
    """RMSNorm of the rows of a 2-D tensor with a hand-written backward. With the compiled CPU
    kernels (``moec_cpu_fused``) each direction is one pass over the rows; otherwise the
    statistics take one reduction pass (``vector_norm``) and the backward runs over chunks of
    rows small enough to stay in cache, with every elementwise pass in place. Forward+backward
    at d = 512 against the composite ``F.rms_norm``: 2.1 -> 0.2 ms at 1024 rows, 12.5 -> 0.8 ms
    at 4096 rows (1.1 and 3.3 ms with torch ops)."""

    @staticmethod
    def rows(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(normalised rows, 1 / rms per row)."""
        if _cpu_fused.available(x.dtype):
            return _cpu_fused.rms_norm_forward(x.contiguous(), weight.contiguous(), eps)
        rstd = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_().div_(x.shape[1]).add_(eps).rsqrt_()
        return torch.mul(x, rstd).mul_(weight), rstd

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _RMSNormRows.rows(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad):
        # d/dx: rstd * (g w - x * rstd^2 * <g w, x> / d) with g = grad; d/dw: sum over rows of g x rstd.
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        d = x.shape[1]
        if torch.is_grad_enabled():  # create_graph: differentiable, rstd recomputed from x (the saved one has no graph)
            rstd = (x.square().mean(1, keepdim=True) + ctx.eps).rsqrt()
            g = grad * rstd
            gw = g * weight
            c = torch.linalg.vecdot(gw, x).unsqueeze(1) * rstd.square() / d
            return (gw - x * c if need_x else None), (torch.linalg.vecdot(g, x, dim=0) if need_w else None), None
        if _cpu_fused.available(x.dtype):
            dx, dw = _cpu_fused.rms_norm_backward(grad.contiguous(), x.contiguous(), weight.contiguous(), rstd,
                                                  need_x, need_w)
            return dx, dw, None
        dx = torch.empty_like(x)  # holds g = grad * rstd, then g w, then dx
        dw = torch.zeros_like(weight) if need_w else None
        step = max(1, _NORM_CHUNK_ELEMENTS // max(d, 1))
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            xc, rc = x[rows], rstd[rows]
            g = torch.mul(grad[rows], rc, out=dx[rows])
            if dw is not None:
                dw += (g * xc).sum(0)
            if need_x:
                gw = g.mul_(weight)
                c = torch.linalg.vecdot(gw, xc).unsqueeze_(1).mul_(rc.square()).div_(d)
                gw.addcmul_(xc, c, value=-1)
        return (dx if need_x else None), dw, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter, same results) with a faster path for fp32 / fp64 CPU
    tensors (``_RMSNormRows``); other devices, dtypes and export tracing use ``nn.RMSNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w is None or len(self.normalized_shape) != 1
                or x.dtype not in (torch.float32, torch.float64) or w.dtype != x.dtype
                or torch.compiler.is_compiling()):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        rows = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _RMSNormRows.apply(rows, w, eps).view(x.shape)
        return _RMSNormRows.rows(rows, w, eps)[0].view(x.shape)


class _DenseSwiGLU(torch.autograd.Function):
    """``(silu(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd`` for 2-D ``x`` (``nn.Linear`` weights), with
    the elementwise work between the GEMMs as one compiled loop per direction (``moec_cpu_fused``):
    keeps x and the two pre-activations for backward, where the eager form keeps five tensors."""

    @staticmethod
    def forward(ctx, x, up_w, up_b, gate_w, gate_b, down_w, down_b):
        g, u = F.linear(x, gate_w, gate_b), F.linear(x, up_w, up_b)
        ctx.save_for_backward(x, g, u, up_w, gate_w, down_w)
        ctx.biases = (up_b is not None, gate_b is not None, down_b is not None)
        return F.linear(_cpu_fused.swiglu_forward(g, u), down_w, down_b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, g, u, up_w, gate_w, down_w = ctx.saved_tensors
        dy = dy.contiguous()
        h = dy @ down_w  # d h, then (in place) h itself; g and u become their gradients
        _cpu_fused.swiglu_backward_(h, g, u)
        du, dg = u, g
        dx = torch.addmm(du @ up_w, dg, gate_w)
        up_b, gate_b, down_b = ctx.biases
        return (dx, du.t() @ x, du.sum(0) if up_b else None, dg.t() @ x, dg.sum(0) if gate_b else None,
                dy.t() @ h, dy.sum(0) if down_b else None)


class FeedForward(nn.Module):
    """A dense expert: act(x W_up) W_down, or (act(x W_gate) * x W_up) W_down when glu;
    `ternary` quantises the matrices with ``ternarize`` in every forward. SwiGLU on the CPU runs
    as ``_DenseSwiGLU`` where the compiled kernels are available."""

    def __init__(self, dim: int, hidden: int, glu: bool, activation: str, bias: bool = False,
                 ternary: bool = False, output_gate: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.gate_proj = nn.Linear(dim, hidden, bias=bias) if glu else None
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = _activation(activation)
        self.activation = activation
        self.ternary = ternary
        # output_gate: the output is scaled by sigmoid(x . w) per token (Qwen2-MoE's shared expert gate)
        self.output_gate = nn.Linear(dim, 1, bias=False) if output_gate else None

    def _weight(self, layer: nn.Linear) -> Tensor:
        return ternarize(layer.weight) if self.ternary else layer.weight

    def _linear(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return F.linear(x, self._weight(layer), layer.bias)

    def _fused(self, x: Tensor) -> bool:
        if self.gate_proj is None or self.activation != "silu" or x.device.type != "cpu":
            return False
        tensors = [t for layer in (self.up_proj, self.gate_proj, self.down_proj) for t in (layer.weight, layer.bias)
                   if t is not None]
        return (all(t.dtype == x.dtype and t.device == x.device for t in tensors)
                and not torch.compiler.is_compiling() and _autocast_dtype(x) is None
                and _cpu_fused.available(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self._fused(x):
            y = _DenseSwiGLU.apply(x.reshape(-1, x.shape[-1]), self._weight(self.up_proj), self.up_proj.bias,
                                   self._weight(self.gate_proj), self.gate_proj.bias,
                                   self._weight(self.down_proj), self.down_proj.bias).view(*x.shape[:-1], self.down_proj.out_features)
        elif self.gate_proj is not None:
            y = self._linear(self.down_proj, self.act(self._linear(self.gate_proj, x)) * self._linear(self.up_proj, x))
        else:
            y = self._linear(self.down_proj, self.act(self._linear(self.up_proj, x)))
        if self.output_gate is not None:
            y = torch.sigmoid(self.output_gate(x)) * y
        return y


class Experts(nn.Module):
    """Stacked weights of `num_experts` experts: up_proj / gate_proj [E, dim, hidden], down_proj
    [E, hidden, dim] (x @ W layout, as grouped GEMMs want), biases [E, hidden] / [E, dim]."""

    def __init__(self, num_experts: int, dim: int, hidden: int, glu: bool, bias: bool = False):
        super().__init__()

        def weight(n_in: int, n_out: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(n_in)
            return nn.Parameter(torch.empty(num_experts, n_in, n_out).uniform_(-bound, bound))

        def bias_(n_in: int, n_out: int) -> nn.Parameter | None:
            if not bias:
                return None
            bound = 1.0 / math.sqrt(n_in)
            return nn.Parameter(torch.empty(num_experts, n_out).uniform_(-bound, bound))

        self.up_proj = weight(dim, hidden)
        self.gate_proj = weight(dim, hidden) if glu else None
        self.down_proj = weight(hidden, dim)
        self.up_bias = bias_(dim, hidden)
        self.gate_bias = bias_(dim, hidden) if glu else None
        self.down_bias = bias_(hidden, dim)


class LoRAExperts(nn.Module):
    """`num_experts` LoRA experts over one frozen base FFN (``base``: stacked weights of one expert,
    ``requires_grad=False``): expert e's matrix P is ``W0_P + (alpha / rank) * P_lora_a[e] @
    P_lora_b[e]`` (A [E, in, r] random, B [E, r, out] zero, so training starts at the base) for the
    projections in ``adapted`` (all by default); the others are the base matrix for every expert.

    ``up_proj`` / ``gate_proj`` / ``down_proj`` (and the biases) are the merged [E, in, out] weights,
    so every dispatch path can read them like ``Experts``; merging costs E x in x out per matrix and
    call. Generated models call ``moe_lora_experts``, which never merges (the static form still
    reads the merged weights)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, glu: bool, bias: bool = False, rank: int = 8,
                 alpha: float | None = None, adapted: tuple[str, ...] | None = None):
        super().__init__()
        self.scale = (alpha if alpha is not None else rank) / rank
        self.base = Experts(1, dim, hidden, glu, bias).requires_grad_(False)
        shapes = {"up": (dim, hidden), "down": (hidden, dim), **({"gate": (dim, hidden)} if glu else {})}
        self.adapted = tuple(shapes) if adapted is None else tuple(adapted)
        for name in self.adapted:
            n_in, n_out = shapes[name]
            a = torch.empty(num_experts, n_in, rank).uniform_(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in))
            self.register_parameter(f"{name}_lora_a", nn.Parameter(a))
            self.register_parameter(f"{name}_lora_b", nn.Parameter(torch.zeros(num_experts, rank, n_out)))
        self.num_experts, self.glu = num_experts, glu

    def _merged(self, name: str) -> Tensor:
        base = getattr(self.base, f"{name}_proj")
        if name not in self.adapted:
            return base.expand(self.num_experts, -1, -1)
        a, b = getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b")
        return base + self.scale * torch.bmm(a, b)

    def _bias(self, name: str) -> Tensor | None:
        b = getattr(self.base, f"{name}_bias")
        return None if b is None else b.expand(self.num_experts, -1)

    up_proj = property(lambda self: self._merged("up"))
    down_proj = property(lambda self: self._merged("down"))
    gate_proj = property(lambda self: self._merged("gate") if self.glu else None)
    up_bias = property(lambda self: self._bias("up"))
    down_bias = property(lambda self: self._bias("down"))
    gate_bias = property(lambda self: self._bias("gate") if self.glu else None)


def modality_rows(modality: Tensor, ids: tuple[int, ...]) -> dict[int, Tensor]:
    """The flat token rows of each modality id in `ids` (in token order), for the PerModality
    modules of a block: one host sync for all of them."""
    mods = modality.reshape(-1)
    order = torch.argsort(mods, stable=True)
    counts = torch.bincount(mods, minlength=max(ids) + 1).tolist()  # host sync: the segment sizes
    segments = dict(enumerate(order.split(counts)))
    return {i: segments[i] for i in ids}


def modality_masks(modality: Tensor, ids: tuple[int, ...]) -> dict[int, Tensor]:
    """Per modality id in `ids`, which flat tokens have it (bool [N]): ``modality_rows`` of the
    static form, where no shape may depend on the data (no host sync)."""
    mods = modality.reshape(-1)
    return {i: mods == i for i in ids}


class PerModality(nn.Module):
    """One copy of a token-wise module per modality (Mixture-of-Transformers): each token goes
    through the copy of its modality. ``ids`` are the modality ids the copies serve, in the order
    of ``copies`` (their names are the modality names). ``modality`` is the ids tensor (one host
    sync per modality) or the rows of ``modality_rows`` computed once per block; a modality without
    tokens costs nothing. Given ``modality_masks`` instead (the static form), every copy runs on
    all tokens and each token keeps its own copy's output: fixed shapes, n copies' work."""

    def __init__(self, ids: tuple[int, ...], **copies: nn.Module):
        super().__init__()
        if len(ids) != len(copies):
            raise ValueError(f"PerModality: {len(ids)} ids for {len(copies)} copies")
        self.ids = tuple(ids)
        for name, module in copies.items():
            self.add_module(name, module)

    def forward(self, x: Tensor, modality: Tensor | dict[int, Tensor]) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if isinstance(modality, Tensor):
            mods = modality.reshape(-1)
            rows = {i: (mods == i).nonzero().squeeze(1) for i in self.ids}
        else:
            rows = modality
        if all(r.dtype == torch.bool for r in rows.values()):
            return self._masked(flat, rows).reshape(*x.shape[:-1], -1)
        parts = [(rows[i], module(flat.index_select(0, rows[i]))) for i, module in zip(self.ids, self.children())]
        width = parts[0][1].shape[-1]
        out = flat.new_zeros(flat.shape[0], width, dtype=parts[0][1].dtype)
        for idx, y in parts:
            out = out.index_copy(0, idx, y)
        return out.reshape(*x.shape[:-1], width)

    def _masked(self, flat: Tensor, masks: dict[int, Tensor]) -> Tensor:
        out = None
        for i, module in zip(self.ids, self.children()):
            y = module(flat)
            out = torch.where(masks[i].unsqueeze(1), y, torch.zeros_like(y) if out is None else out)
        return out


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention over dim -2 of x [..., S, dim].

    Positions are 0..S-1 along dim -2. ``rope_theta`` applies rotary position embeddings to q and
    k (the rotate-half convention: dimension i pairs with i + head_dim / 2); ``qk_norm`` applies
    RMSNorm (eps ``norm_eps``) to q and k before the rotation, per head (``"head"``, over
    head_dim) or over the whole projection (``"projection"``); ``out_bias`` (default: ``bias``)
    gives the output projection its own bias setting."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, bias: bool = False,
                 causal: bool = True, rope_theta: float | None = None, qk_norm: str = "none",
                 norm_eps: float = 1e-6, out_bias: bool | None = None,
                 per_modality: dict[str, int] | None = None, routed_heads: int | None = None,
                 shared_heads: int = 0):
        super().__init__()
        # Mixture-of-heads: per token, the first `shared_heads` heads are weighted by a softmax over
        # them and the top `routed_heads` of the others by a softmax over those (the rest get 0);
        # with shared heads a 2-way softmax mixes the two groups. Every head is still computed.
        self.routed_heads, self.shared_heads = routed_heads, shared_heads
        if routed_heads is not None:
            self.head_router = nn.Linear(dim, heads - shared_heads, bias=False)
            if shared_heads:
                self.shared_router = nn.Linear(dim, shared_heads, bias=False)
                self.head_mix = nn.Linear(dim, 2, bias=False)
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.rope_theta, self.qk_norm = rope_theta, qk_norm

        def linear(n_in: int, n_out: int, b: bool) -> nn.Module:
            if per_modality is None:
                return nn.Linear(n_in, n_out, bias=b)
            return PerModality(tuple(per_modality.values()), **{m: nn.Linear(n_in, n_out, bias=b)
                                                                for m in per_modality})

        self.q_proj = linear(dim, heads * head_dim, bias)
        self.k_proj = linear(dim, kv_heads * head_dim, bias)
        self.v_proj = linear(dim, kv_heads * head_dim, bias)
        self.o_proj = linear(heads * head_dim, dim, bias if out_bias is None else out_bias)
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps=norm_eps), RMSNorm(head_dim, eps=norm_eps)
        elif qk_norm == "projection":
            self.q_norm = RMSNorm(heads * head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(kv_heads * head_dim, eps=norm_eps)
        elif qk_norm != "none":
            raise ValueError(f"Attention: qk_norm must be 'none', 'head' or 'projection', got {qk_norm!r}")

    def forward(self, x: Tensor, modality: Tensor | dict[int, Tensor] | None = None, route=None) -> Tensor:
        """``modality`` (ids shaped like x.shape[:-1], or their ``modality_rows``) picks the projections
        of per-modality attention.
        With a Mixture-of-Depths ``route`` (moec_depth.DepthRoute), x [N, dim] holds the kept
        tokens' rows: each attends to the kept tokens of its own sequence, at its original position
        (``modality``: the kept rows' ids, or their ``modality_masks`` when the route pads none)."""
        if route is not None:
            mods = route.pad(modality) if isinstance(modality, Tensor) else modality  # masks: flat, as the rows
            out = self._attend(route.pad(x), mods, route.padded_positions(), route.attention_mask(self.causal),
                               route.seq_len)
            return route.unpad(out)
        shape = x.shape
        seq = shape[-2] if x.dim() >= 2 else 1
        b = math.prod(shape[:-2]) if x.dim() > 2 else 1
        mods = modality if modality is None or isinstance(modality, dict) else modality.reshape(b, seq)
        return self._attend(x.reshape(b, seq, shape[-1]), mods).reshape(shape)

    def _attend(self, xs: Tensor, mods: Tensor | None, positions: Tensor | None = None,
                mask: Tensor | None = None, seq_len: int = 0) -> Tensor:
        """Attention over xs [b, seq, dim]: causal by index unless `mask` ([b, 1, seq, seq], True =
        may attend) is given; rotary positions are 0..seq-1 unless `positions` [b, seq] (each below
        `seq_len`) is given."""
        b, seq = xs.shape[0], xs.shape[1]

        def project(layer: nn.Module, t: Tensor) -> Tensor:
            return layer(t) if isinstance(layer, nn.Linear) else layer(t, mods)

        q, k, v = project(self.q_proj, xs), project(self.k_proj, xs), project(self.v_proj, xs)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, seq, self.heads, self.head_dim)
        k = k.view(b, seq, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            length = seq if positions is None else seq_len
            cos, sin = rotary_cos_sin(length, self.head_dim, self.rope_theta, xs.device, q.dtype)
            if positions is not None:  # [b, 1, seq, head_dim]: each token at its own position
                cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2)  # [b, seq, heads, hd]
        if self.routed_heads is not None:
            o = o * self.head_weights(xs).unsqueeze(-1).to(o.dtype)
        return project(self.o_proj, o.reshape(b, seq, self.heads * self.head_dim))

    def head_weights(self, x: Tensor) -> Tensor:
        """Mixture-of-heads weights [..., heads] of the tokens x [..., dim] (0 for unchosen heads)."""
        probs = torch.softmax(_at_least_fp32(self.head_router(x)), dim=-1)
        top = top_k(probs.detach().reshape(-1, probs.shape[-1]), self.routed_heads)[1]
        top = top.view(*probs.shape[:-1], self.routed_heads)
        chosen = F.one_hot(top, probs.shape[-1]).sum(-2).to(probs.dtype)  # (one-hot: exports to MLIR)
        routed = probs * chosen
        if not self.shared_heads:
            return routed
        mix = torch.softmax(_at_least_fp32(self.head_mix(x)), dim=-1)
        shared = torch.softmax(_at_least_fp32(self.shared_router(x)), dim=-1)
        return torch.cat([mix[..., :1] * shared, mix[..., 1:] * routed], dim=-1)


class AttentionExperts(nn.Module):
    """Attention experts (mixture of attention, JetMoE; BAM with shared key and value) over dim -2
    of x [..., S, dim]: expert e has its own query projection ``q_proj[e]`` [dim, heads * head_dim]
    and output projection ``o_proj[e]`` [heads * head_dim, dim] (x @ W layout, as ``Experts``);
    ``k_proj`` / ``v_proj`` are shared by every expert and computed once per token.

    A router (softmax over ``num_experts``, top ``top_k``, optionally renormalised) picks each
    token's experts; the token's output is sum_j g_j * o_proj[e_j](attention(q of e_j, K, V)).
    Each (token, slot) takes its expert's query and attends over the shared keys and values of
    its sequence (causal by default). ``dispatch`` chooses how the per-expert query and output
    projections run: "sorted" sorts the (token, slot) rows by expert and runs them as grouped
    GEMMs (only the chosen experts' FLOPs; at most one host sync, none with a native
    ``torch._grouped_mm``); "dense" runs one GEMM over every expert (E / top_k times the FLOPs,
    memory T * E * heads * head_dim, but no data-dependent shapes); "auto" (default) is "dense"
    while torch.export / torch.compile trace the module (the static form exports) and "sorted"
    otherwise. ``rope_theta`` / ``qk_norm`` / ``norm_eps`` work as in ``Attention``, the
    q / k norms shared by the experts; biases: q and o per expert, k and v shared.

    ``forward`` returns ``(y, aux_loss, counts)``: the aux loss weights the load-balance and z
    losses by ``load_balance`` / ``z_loss`` (zero without them); counts [num_experts] are the
    (token, slot) pairs per expert."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, num_experts: int, top_k: int,
                 bias: bool = False, causal: bool = True, rope_theta: float | None = None, qk_norm: str = "none",
                 norm_eps: float = 1e-6, out_bias: bool | None = None, renormalize: bool = False,
                 load_balance: float = 0.0, z_loss: float = 0.0):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"AttentionExperts: heads = {heads} is not a multiple of kv_heads = {kv_heads}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"AttentionExperts: top_k = {top_k} must be in [1, {num_experts}]")
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.rope_theta, self.qk_norm = rope_theta, qk_norm
        self.load_balance, self.z_loss = load_balance, z_loss
        self.dispatch = "auto"
        inner = heads * head_dim

        def uniform(n_in: int, *shape: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(n_in)
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.router = nn.Linear(dim, num_experts, bias=False)
        self.q_proj = uniform(dim, num_experts, dim, inner)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = uniform(inner, num_experts, inner, dim)
        self.q_bias = uniform(dim, num_experts, inner) if bias else None
        self.o_bias = uniform(inner, num_experts, dim) if (bias if out_bias is None else out_bias) else None
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps=norm_eps), RMSNorm(head_dim, eps=norm_eps)
        elif qk_norm == "projection":
            self.q_norm = RMSNorm(inner, eps=norm_eps)
            self.k_norm = RMSNorm(kv_heads * head_dim, eps=norm_eps)
        elif qk_norm != "none":
            raise ValueError(f"AttentionExperts: qk_norm must be 'none', 'head' or 'projection', got {qk_norm!r}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        seq = shape[-2] if x.dim() >= 2 else 1
        b = math.prod(shape[:-2]) if x.dim() > 2 else 1
        flat = x.reshape(b * seq, shape[-1])
        kk, hd, inner = self.top_k, self.head_dim, self.heads * self.head_dim
        logits = self.router(flat)
        weights, ids, probs = route_top_k(logits, kk, renormalize=self.renormalize)  # [T, k]
        if self.dispatch not in ("auto", "sorted", "dense"):
            raise ValueError(f"AttentionExperts: dispatch must be 'auto', 'sorted' or 'dense', got {self.dispatch!r}")
        dense = self.dispatch == "dense" or (self.dispatch == "auto" and torch.compiler.is_compiling())
        sort = None if dense else self._sort(ids)
        q = self._dense_queries(flat, ids) if dense else self._sorted_queries(flat, ids, sort)  # [T, k, inner]
        k = self.k_proj(flat)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, seq, kk, self.heads, hd)
        k = k.view(b, seq, self.kv_heads, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        # slots become batch entries: [b * k, heads, seq, hd], each attending over its sequence
        q = q.permute(0, 2, 3, 1, 4).reshape(b * kk, self.heads, seq, hd)
        k = k.transpose(1, 2)
        v = self.v_proj(flat).view(b, seq, self.kv_heads, hd).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rotary_cos_sin(seq, hd, self.rope_theta, x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        k = k.unsqueeze(1).expand(b, kk, self.heads, seq, hd).reshape(b * kk, self.heads, seq, hd)
        v = v.unsqueeze(1).expand(b, kk, self.heads, seq, hd).reshape(b * kk, self.heads, seq, hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [b * k, heads, seq, hd]
        o = o.view(b, kk, self.heads, seq, hd).permute(0, 3, 1, 2, 4).reshape(b * seq, kk, inner)
        g = weights.unsqueeze(-1).to(o.dtype)
        y = self._dense_outputs(o * g, ids) if dense else self._sorted_outputs(o * g, sort)
        if self.o_bias is not None:
            y = y + (g * self.o_bias[ids]).sum(1)
        aux = logits.new_zeros((), dtype=probs.dtype)
        counts = expert_counts(ids, self.num_experts)
        if self.load_balance:
            aux = aux + self.load_balance * load_balance_loss(probs, ids, self.num_experts, counts=counts)
        if self.z_loss:
            aux = aux + self.z_loss * z_loss(logits)
        return y.reshape(shape), aux, counts

    def _dense_queries(self, flat: Tensor, ids: Tensor) -> Tensor:
        """Queries of every expert in one GEMM, then each (token, slot) takes its expert's."""
        E, inner = self.num_experts, self.heads * self.head_dim
        q_all = (flat @ self.q_proj.permute(1, 0, 2).reshape(flat.shape[1], E * inner)).view(-1, E, inner)
        if self.q_bias is not None:
            q_all = q_all + self.q_bias
        return q_all.gather(1, ids.unsqueeze(-1).expand(-1, -1, inner))

    def _dense_outputs(self, o: Tensor, ids: Tensor) -> Tensor:
        """Each slot's weighted attention output [T, k, inner] in its expert's columns (a token's
        experts are distinct), then one GEMM with every o_proj."""
        E, inner = self.num_experts, self.heads * self.head_dim
        placed = o.new_zeros(o.shape[0], E, inner).scatter(1, ids.unsqueeze(-1).expand(-1, -1, inner), o)
        return placed.reshape(-1, E * inner) @ self.o_proj.reshape(E * inner, -1)

    def _sort(self, ids: Tensor) -> tuple[Tensor, Tensor, _ExpertSegments]:
        """(order of the flat (token, slot) pairs by expert, their tokens, the expert segments)."""
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=ids.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        return order, torch.div(order, ids.shape[1], rounding_mode="floor"), _ExpertSegments(counts, self.num_experts)

    def _sorted_queries(self, flat: Tensor, ids: Tensor, sort: tuple) -> Tensor:
        """Each (token, slot)'s query from its expert's q_proj alone: grouped GEMM over the rows
        sorted by expert, then back to [T, k, inner] order."""
        order, tok, segments = sort
        q = segments.matmul(flat.index_select(0, tok), self.q_proj)
        if self.q_bias is not None:
            q = q + self.q_bias.index_select(0, ids.reshape(-1).index_select(0, order))
        unsorted = q.new_empty(q.shape).index_copy(0, order, q)
        return unsorted.view(*ids.shape, q.shape[-1])

    def _sorted_outputs(self, o: Tensor, sort: tuple) -> Tensor:
        """Sum over each token's slots of its weighted attention output [T, k, inner] times the
        slot's expert's o_proj: grouped GEMM over the rows sorted by expert, summed per token."""
        order, tok, segments = sort
        rows = segments.matmul(o.reshape(-1, o.shape[-1]).index_select(0, order), self.o_proj)
        return rows.new_zeros(o.shape[0], rows.shape[-1]).index_add(0, tok, rows)


def rotary_cos_sin(seq: int, dim: int, theta: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [seq, dim] of rotary position embeddings at positions 0..seq-1: frequency
    theta^(-2i/dim) for i < dim/2, repeated for the two halves (as transformers computes them)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                                / dim))
    freqs = torch.arange(seq, device=device, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate t [..., seq, dim] by position. Rotate-half: dimension i pairs with i + dim/2.
    Interleaved: dimensions (2i, 2i+1) pair up, and the result is laid out as the rotate-half
    form's halves (the even results, then the odd ones), as DeepSeek-V3's checkpoints expect."""
    if interleaved:
        half = t.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        t1, t2 = t[..., 0::2], t[..., 1::2]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)
    t1, t2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2:]
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) over dim -2 of x [..., S, dim], causal.

    Queries: ``q_proj`` (or, with ``q_rank``, ``q_b_proj(q_a_norm(q_a_proj(x)))``), per head
    ``qk_nope_dim`` dims without and ``qk_rope_dim`` dims with rotary embeddings. Keys and values
    come from one compressed latent: ``kv_a_proj(x)`` gives ``kv_rank`` latent dims (normalised by
    ``kv_a_norm``, expanded by ``kv_b_proj`` to per-head no-rope keys and values of ``v_dim``)
    and ``qk_rope_dim`` rotary key dims shared by all heads. Scores are scaled by
    (qk_nope_dim + qk_rope_dim)^-0.5; the latent norms use ``eps``."""

    def __init__(self, dim: int, heads: int, kv_rank: int, qk_nope_dim: int, qk_rope_dim: int, v_dim: int,
                 q_rank: int | None = None, rope_theta: float = 10000.0, rope_interleave: bool = False,
                 bias: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads, self.kv_rank, self.nope, self.rope, self.v_dim = heads, kv_rank, qk_nope_dim, qk_rope_dim, v_dim
        self.rope_theta, self.rope_interleave = rope_theta, rope_interleave
        qk = qk_nope_dim + qk_rope_dim
        if q_rank is None:
            self.q_proj = nn.Linear(dim, heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_rank, bias=bias)
            self.q_a_norm = RMSNorm(q_rank, eps=eps)
            self.q_b_proj = nn.Linear(q_rank, heads * qk, bias=False)
        self.kv_a_proj = nn.Linear(dim, kv_rank + qk_rope_dim, bias=bias)
        self.kv_a_norm = RMSNorm(kv_rank, eps=eps)
        self.kv_b_proj = nn.Linear(kv_rank, heads * (qk_nope_dim + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        seq = shape[-2] if x.dim() >= 2 else 1
        b = math.prod(shape[:-2]) if x.dim() > 2 else 1
        xs = x.reshape(b, seq, shape[-1])
        q = self.q_proj(xs) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_norm(self.q_a_proj(xs)))
        q = q.view(b, seq, self.heads, self.nope + self.rope).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.nope, self.rope], dim=-1)
        latent, k_rot = torch.split(self.kv_a_proj(xs), [self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(b, seq, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_pass, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        cos, sin = rotary_cos_sin(seq, self.rope, self.rope_theta, x.device, q.dtype)
        q_rot = apply_rotary(q_rot, cos, sin, self.rope_interleave)
        k_rot = apply_rotary(k_rot.view(b, 1, seq, self.rope), cos, sin, self.rope_interleave)
        q = torch.cat((q_pass, q_rot), dim=-1)
        k = torch.cat((k_pass, k_rot.expand(-1, self.heads, -1, -1)), dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, seq, self.heads * self.v_dim)).reshape(shape)
