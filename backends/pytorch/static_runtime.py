"""moec static-shape runtime: capacity-padded MoE dispatch for ``torch.export`` and torch-mlir.

This file is copied verbatim next to generated model code, beside ``moec_runtime.py``, whose
argument checks and activations it shares.  Beyond those it depends only on ``torch``,
``math`` and ``contextlib`` (never on ``moec``); routing itself stays ``moec_runtime.route_top_k``, which exports
and lowers as it is (``softmax``/``sigmoid``, ``top_k``'s comparisons + ``gather``).

Every function here produces tensors whose shapes depend only on the *shapes* of its inputs
(``T`` tokens, ``k`` slots per token, ``E`` experts, ``C`` capacity, ``d``/``f`` widths),
never on their values: no ``nonzero``, no boolean-mask indexing, no ``.tolist()``/``.item()``,
no stable sort (in fact no sort at all), no ``cumsum``, no ``bincount``, no ``scatter_add``
/ ``index_add``, no ``torch._grouped_mm`` in the forward graph (autograd's backward of
``index_select`` is an ``index_add``; that only matters for training, not for export).
Host synchronisations per call: 0 for every function (``HOST_SYNCS``).

Public API
----------
``moe_experts_static(x, expert_ids, weights, up_proj, down_proj, gate_proj=None,
activation="silu", up_bias=None, down_bias=None, gate_bias=None, capacity=None,
token_mask=None)`` -> ``Tensor[T, d]``
    The math of ``moec_runtime.moe_experts``: ``y[t] = sum_j weights[t, j] *
    FFN_{expert_ids[t, j]}(x[t])`` over the *kept* slots (same shapes, dtypes, activations
    and bias conventions), computed as:

    1. ``valid[n]`` for each flat slot ``n = t * k + j``: ``0 <= expert_ids[t, j] < E`` and
       ``token_mask[t]`` (if given).  Ids of -1 (or any out-of-range id) and masked tokens
       are never dispatched.
    2. ``pos[n]``: the number of valid slots ``m < n`` routed to the same expert, i.e. the
       slot's rank inside its expert in token-major order (token ``t`` before ``t + 1``,
       slot ``j`` before ``j + 1``) -- the order of ``moe_experts``' stable sort.  Computed
       without ``cumsum``/sort: a one-hot ``[N, E]`` (N = T*k) is cut into ``B`` blocks of
       ``S = ceil(sqrt(N))`` rows; a strictly-lower-triangular ``[S, S]`` ones matrix
       times each block gives the in-block exclusive prefix counts and a ``[B, B]`` one
       times the block totals gives the counts before each block (``O(N^1.5 E)`` matmul
       work, ``O(N E)`` memory).  The matmuls run in fp32 (fp64 when ``N > 2**24``) with
       autocast disabled, so the integer counts are exact.
    3. ``keep[n] = valid[n] & (pos[n] < C)``: an expert takes its first ``C`` valid slots
       in that order; later ones are **dropped** (they contribute exactly 0 and get zero
       gradient, like ``expert_ids == -1`` in ``moe_experts``).
    4. Kept rows are written with one ``index_copy`` into a ``[E * C + N, d]`` buffer at
       row ``e * C + pos``; each non-kept slot ``n`` writes its own spare row ``E * C + n``,
       so all indices are unique (TOSA's scatter requires that) and the result is
       deterministic.  The first ``E * C`` rows are viewed as ``[E, C, d]``.
    5. One ``torch.bmm`` per projection (``[E, C, d] @ [E, d, f]``, ...), biases broadcast
       over ``C``.  Padding rows compute ``FFN(0)`` and are never read.
    6. Combine by gather, not scatter: each slot gathers its output row
       (``index_select``), multiplies its routing weight in, non-kept slots are replaced by
       0 (``torch.where``, so a non-finite padding row cannot leak), and the ``k`` slots of
       a token are summed: ``[T, k, d].sum(1)``.  Accumulation is fp32 (fp64 for fp64 ``x``);
       the result has ``x.dtype``.

    ``capacity`` (C): rows per expert.  Default ``None`` means ``C = T``, which never drops a
    slot when each token's ``k`` ids are distinct (``route_top_k`` guarantees that: an
    expert then receives at most one slot per token).  For id lists with repeated experts
    in one row pass ``capacity=T * k`` (always exact).  Cost: ``E * C`` rows go through
    every projection, i.e. ``E / k`` times the useful work at ``C = T``; use
    ``static_capacity(T, k, E, capacity_factor)`` (GShard/Switch capacity factor) to trade
    dropped slots for speed.  ``capacity=0`` drops everything.

    ``token_mask`` (bool ``[T]``): tokens with False contribute nothing (their output rows
    are 0, their gradients are 0) and take no capacity.  This is how modality groups run in
    static form: every group sees all ``T`` tokens, masked, and the group outputs add up.
    With a mask, ``moe_experts_static(x, ids, w, ..., token_mask=m)`` equals
    ``moe_experts`` run on the rows ``m`` selects, scattered back into zeros.

``static_capacity(num_tokens, k, num_experts, capacity_factor=None)`` -> int
    ``num_tokens`` when ``capacity_factor`` is None (the lossless default), else
    ``ceil(capacity_factor * num_tokens * k / num_experts)`` clamped to ``[1, num_tokens]``.
    Pure Python on static sizes (``x.shape[0]`` is a Python int while exporting).

``token_mask_for(modality, modalities)`` -> ``BoolTensor`` shaped like ``modality``
    ``modality`` is in the tuple ``modalities`` (chained ``==`` / ``|``; ``torch.isin`` is
    avoided because it lowers through ``aten.any.dims``, which TOSA rejects).

``expert_counts_static(expert_ids, num_experts, token_mask=None)`` -> ``LongTensor[E]``
    Routed (token, slot) assignments per expert over the unmasked tokens, before capacity
    dropping (the same numbers ``moec_runtime.expert_counts`` gives for the selected rows);
    ids outside ``[0, E)`` ignored.  One-hot compare + sum (no ``bincount``/``scatter_add``).

``load_balance_loss_static(probs, expert_ids, num_experts, token_mask=None)`` -> scalar
    ``moec_runtime.load_balance_loss`` over the unmasked tokens: ``E * sum_e f_e * P_e`` with
    ``f_e`` from ``expert_counts_static`` and ``P_e`` the masked mean of ``probs[:, e]``
    (``sum(mask * probs) / max(sum(mask), 1)``).  0 when no token is selected.

``z_loss_static(logits, token_mask=None)`` -> scalar
    ``mean(logsumexp(logits)^2)`` over the unmasked tokens; 0 when none is selected.

``ACTIVATIONS``, ``HOST_SYNCS``.

What lowers (torch 2.13.0, torch-mlir 20261001, ``torch_mlir.fx.export_and_import``)
-------------------------------------------------------------------------------------------
Checked by tests/test_static_mlir.py: a router + masked static dispatch + losses module lowers
to linalg-on-tensors, stablehlo, tosa and torch, and the linalg output, compiled to LLVM and
run with MLIR's ExecutionEngine, matches PyTorch (with capacity dropping).  The ops used
here -- ``topk`` (routing), ``==``/``&``/``where``, ``arange``, ``matmul``/``bmm``,
``sum``, ``index_select``, ``index_copy`` (unique indices), ``logsumexp`` -- lower to all of
``linalg-on-tensors``, ``stablehlo`` and ``tosa``.  ``index_copy`` becomes
``tm_tensor.scatter`` / ``stablehlo.scatter`` / ``tosa.scatter`` and ``topk`` becomes
``tm_tensor.sort`` in linalg-on-tensors output (torch-mlir's TMTensor dialect; IREE
consumes it, ``torch-mlir-opt --tm-tensor-to-loops`` turns it into loops).  Measured on the
dynamic runtime's ops: ``sort(stable=True)`` fails on every dialect (``torch.aten.sort.stable``
is not legalised); plain ``sort``/``argsort`` fail on TOSA; ``index_add``, ``scatter_add``
and ``index_put(accumulate=True)`` fail on TOSA; ``bincount`` fails on stablehlo and TOSA
(its output shape is data-dependent); ``isin`` fails on TOSA (``aten.any.dims``).
``cumsum`` does lower in this torch-mlir build (``tm_tensor.scan`` / ``reduce_window`` /
a pad+add ladder), but is kept out anyway for older builds.  ``nonzero`` has a
data-dependent output shape and cannot be exported with static shapes at all.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

try:  # inside the moec package
    from .runtime import _activation, _at_least_fp32, _check_shapes
except ImportError:  # shipped next to generated code, beside moec_runtime.py
    from moec_runtime import _activation, _at_least_fp32, _check_shapes

__all__ = [
    "ACTIVATIONS",
    "HOST_SYNCS",
    "expert_counts_static",
    "load_balance_loss_static",
    "moe_experts_static",
    "static_capacity",
    "token_mask_for",
    "z_loss_static",
]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")
HOST_SYNCS: dict[str, int] = {
    "moe_experts_static": 0,
    "expert_counts_static": 0,
    "load_balance_loss_static": 0,
    "z_loss_static": 0,
    "token_mask_for": 0,
}

_EXACT_FP32_COUNT = 2**24  # integer counts up to this are exact in fp32


def _check_mask(token_mask: Tensor | None, T: int, where: str) -> None:
    if token_mask is None:
        return
    if token_mask.dtype != torch.bool or tuple(token_mask.shape) != (T,):
        raise ValueError(f"{where}: token_mask must be a bool tensor of shape [{T}], got "
                         f"{token_mask.dtype} {tuple(token_mask.shape)}")


# --------------------------------------------------------------------------- helpers


def static_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None = None) -> int:
    """Rows per expert: ``num_tokens`` (lossless) or ``ceil(factor * T * k / E)`` in ``[1, T]``."""
    if capacity_factor is None:
        return int(num_tokens)
    if capacity_factor <= 0:
        raise ValueError(f"static_capacity: capacity_factor must be > 0, got {capacity_factor}")
    c = math.ceil(capacity_factor * num_tokens * k / max(num_experts, 1))
    return int(min(max(c, 1), max(num_tokens, 1)))


def token_mask_for(modality: Tensor, modalities: tuple) -> Tensor:
    """Bool mask of the tokens whose modality is in ``modalities`` (no isin, no nonzero)."""
    if len(modalities) == 0:
        return torch.zeros_like(modality, dtype=torch.bool)
    mask = modality == modalities[0]
    for m in modalities[1:]:
        mask = mask | (modality == m)
    return mask


def _no_autocast(device: torch.device):
    """Keep the exact integer-count matmuls out of autocast (fp16/bf16 would round counts)."""
    dev = device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # pragma: no cover - device types autocast does not know
        enabled = False
    return torch.autocast(dev, enabled=False) if enabled else contextlib.nullcontext()


def _strict_lower(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    ar = torch.arange(n, device=device)
    return (ar.unsqueeze(1) > ar.unsqueeze(0)).to(dtype)


def _exclusive_prefix_counts(onehot: Tensor) -> Tensor:
    """``out[n, e] = sum_{m < n} onehot[m, e]`` via blocked triangular matmuls (no cumsum)."""
    N, E = onehot.shape
    S = math.isqrt(N - 1) + 1 if N > 0 else 1  # ceil(sqrt(N)), >= 1
    B = max(-(-N // S), 1)
    pad = B * S - N
    o = onehot if pad == 0 else torch.cat([onehot, onehot.new_zeros(pad, E)])
    o = o.reshape(B, S, E)
    within = torch.matmul(_strict_lower(S, onehot.dtype, onehot.device), o)  # [B, S, E]
    before = torch.matmul(_strict_lower(B, onehot.dtype, onehot.device), o.sum(1))  # [B, E]
    return (within + before.unsqueeze(1)).reshape(B * S, E)[:N]


def _ffn_bmm(xp, act, up, down, gate, ub, db, gb):
    """Expert FFN on ``xp [E, C, d]``: one bmm per projection, biases broadcast over C."""
    u = torch.bmm(xp, up)
    if ub is not None:
        u = u + ub.unsqueeze(1)
    if gate is not None:
        g = torch.bmm(xp, gate)
        if gb is not None:
            g = g + gb.unsqueeze(1)
        h = act(g) * u
    else:
        h = act(u)
    y = torch.bmm(h, down)
    if db is not None:
        y = y + db.unsqueeze(1)
    return y


def _slot_masks(expert_ids: Tensor, num_experts: int, token_mask: Tensor | None):
    """Flat ids [N] (int64), valid [N] bool and the valid one-hot [N, E] bool."""
    T, k = expert_ids.shape
    flat = expert_ids.reshape(T * k).long()
    valid = (flat >= 0) & (flat < num_experts)
    if token_mask is not None:
        valid = valid & token_mask.reshape(T, 1).expand(T, k).reshape(T * k)
    experts = torch.arange(num_experts, device=expert_ids.device)
    onehot = (flat.unsqueeze(1) == experts.unsqueeze(0)) & valid.unsqueeze(1)
    return flat, valid, onehot


# --------------------------------------------------------------------------- experts


def moe_experts_static(
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
    capacity: int | None = None,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Capacity-padded static-shape mixture of expert FFNs; see the module docstring."""
    _check_shapes(x, expert_ids, weights, up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias,
                  caller="moe_experts_static")
    T, d = x.shape
    k = expert_ids.shape[1]
    E = up_proj.shape[0]
    N = T * k
    _check_mask(token_mask, T, "moe_experts_static")
    C = T if capacity is None else int(capacity)
    if C < 0:
        raise ValueError(f"moe_experts_static: capacity must be >= 0, got {capacity}")
    Cb = max(C, 1)  # buffer rows per expert (C = 0 drops every slot but keeps shapes non-empty)
    act = _activation(activation, "moe_experts_static")
    dev = x.device

    flat, valid, onehot = _slot_masks(expert_ids, E, token_mask)
    count_dtype = torch.float32 if N <= _EXACT_FP32_COUNT else torch.float64
    with _no_autocast(dev):
        oh = onehot.to(count_dtype)
        pos = (_exclusive_prefix_counts(oh) * oh).sum(1).long()  # rank within its expert
    keep = valid & (pos < C)

    # dispatch: kept slot -> row e*C + pos; any other slot n -> its own spare row E*C + n
    spare = torch.arange(N, device=dev) + E * Cb
    dest = torch.where(keep, flat.clamp(0, max(E - 1, 0)) * Cb + pos, spare)
    xs = x.unsqueeze(1).expand(T, k, d).reshape(N, d)
    buf = x.new_zeros(E * Cb + N, d).index_copy(0, dest, xs)
    xp = buf[: E * Cb].reshape(E, Cb, d)
    yp = _ffn_bmm(xp, act, up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias)

    # combine: gather each slot's row, weight it, zero the non-kept slots, sum the k slots
    src = torch.where(keep, dest, torch.zeros_like(dest))
    ys = yp.reshape(E * Cb, d).index_select(0, src)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    contrib = ys.to(acc_dtype) * weights.reshape(N, 1).to(acc_dtype)
    contrib = torch.where(keep.unsqueeze(1), contrib, torch.zeros_like(contrib))
    return contrib.reshape(T, k, d).sum(1).to(x.dtype)


# --------------------------------------------------------------------------- counts and losses


def expert_counts_static(expert_ids: Tensor, num_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """Routed assignments per expert (LongTensor[E]) over unmasked tokens, via one-hot sums."""
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_counts_static: expert_ids must be [T, k], got {tuple(expert_ids.shape)}")
    _check_mask(token_mask, expert_ids.shape[0], "expert_counts_static")
    return _slot_masks(expert_ids, num_experts, token_mask)[2].long().sum(0)


def load_balance_loss_static(
    probs: Tensor, expert_ids: Tensor, num_experts: int, token_mask: Tensor | None = None
) -> Tensor:
    """``E * sum_e f_e * P_e`` over the unmasked tokens (fp32 scalar, fp64 for fp64 probs)."""
    probs32 = _at_least_fp32(probs)
    T = probs.shape[0]
    if T == 0:
        return probs32.sum() * 0.0
    counts = expert_counts_static(expert_ids, num_experts, token_mask).to(probs32.dtype)
    frac = counts / counts.sum().clamp_min(1.0)
    if token_mask is None:
        mean_prob = probs32.mean(dim=0)
    else:
        m = token_mask.unsqueeze(1)
        total = torch.where(m, probs32, torch.zeros_like(probs32)).sum(0)
        mean_prob = total / token_mask.to(probs32.dtype).sum().clamp_min(1.0)
    return num_experts * (frac * mean_prob).sum()


def z_loss_static(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """``mean(logsumexp(logits, -1)^2)`` over the unmasked tokens (fp32 scalar); 0 if none."""
    logits32 = _at_least_fp32(logits)
    T = logits.shape[0]
    if T == 0:
        return logits32.sum() * 0.0
    _check_mask(token_mask, T, "z_loss_static")
    sq = torch.logsumexp(logits32, dim=-1).square()
    if token_mask is None:
        return sq.mean()
    return torch.where(token_mask, sq, torch.zeros_like(sq)).sum() / token_mask.to(sq.dtype).sum().clamp_min(1.0)
