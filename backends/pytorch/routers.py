"""moec routers: routing functions beyond plain token-choice top-k.

This file ships next to generated model code (like ``runtime.py``).  It depends only on
``torch`` and the standard library, never on ``moec``.

The routing contract
--------------------
Every ``route_*`` function returns a *routing* in the form ``runtime.moe_experts`` consumes::

    (weights[T, K], expert_ids[T, K] int64, probs[T, E])

* ``K`` is a fixed width per router, so every shape depends only on ``T``, ``E`` and static
  Python parameters (never on the data).  A slot that is not used holds ``expert_ids == -1``
  and ``weights == 0`` (``moe_experts`` ignores it and gives its weight a zero gradient).
* ``probs`` and ``weights`` are fp32, or fp64 for fp64 logits
  (``torch.promote_types(logits.dtype, torch.float32)``).
* ``weights`` are differentiable w.r.t. ``logits`` wherever they are gathered probabilities.
* No function loops in Python over tokens.  Host synchronisations per call are listed in
  ``ROUTER_HOST_SYNCS`` (only ``route_deterministic``'s optional id validation makes one).
* ``T == 0`` is supported everywhere.

Tie rules (which of several equal scores is selected):

* ``route_group_limited`` (groups and experts), ``route_top_k_temperature`` and
  ``route_dynamic_k`` select with ``moec_runtime.top_k``: ties go to the lower id, on every
  device (under ``torch.export``, the same order from comparisons), as in ``route_top_k`` and
  the Triton and HLS targets.
* ``route_expert_choice`` selects tokens with ``torch.topk`` along the token axis: among tied
  tokens the chosen set has the right size, but *which* tied tokens win is ``torch.topk``'s
  choice (deterministic for a given build, device and shape).
* ``apply_capacity`` ranks with stable sorts: see its docstring.

Public API
----------
``route_expert_choice(logits, capacity_factor, score="softmax", group_size=None)``
    Expert-choice routing (Zhou et al. 2022).  K = E.
``route_dynamic_k(logits, threshold, k_min=1, k_max=None, score="softmax", renormalize=False)``
    Cumulative-probability ("top-p") dynamic-k routing.  K = k_max (default E).
``route_deterministic(num_tokens, num_experts, *, by, modality=None, task=None, positions=None,
token_ids=None, validate=True)``
    Routing by modality id, task id or a fixed hash (of ``token_positions(x)``: each token's
    position in its sequence, in generated models).  K = 1.
``token_positions(x)``
    Each token's position along dim -2 of x [..., S, d], flattened like ``x.reshape(-1, d)``.
``route_soft(logits, score="softmax")``
    Dense soft mixture.  K = E.
``route_group_limited(logits, k, num_groups, topk_groups, bias=None, scale=1.0, renormalize=True,
score="sigmoid")``
    DeepSeek-V3 group-limited top-k with an aux-loss-free balance bias.  K = k.
``update_balance_bias(bias, expert_counts, rate)``
    The aux-loss-free bias update (in place).
``apply_capacity(weights, expert_ids, num_experts, capacity_factor, policy="position")``
    Token-choice capacity dropping; returns ``(weights, expert_ids, dropped_count)``.
``router_jitter(x, eps, training, generator=None)``
    Switch-style multiplicative input jitter.
``schedule_value(kind, step, total, start, end)``
    constant / linear / cosine schedules (Python floats) for dense-to-sparse gates.
``route_top_k_temperature(logits, k, temperature, renormalize=False)``
    Top-k of a tempered softmax.  K = k.

The selections use ``moec_runtime.top_k`` (ties to the lower index) and ``descending_rank``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

try:  # inside the moec package
    from .runtime import top_k
except ImportError:  # shipped next to generated code, beside moec_runtime.py
    from moec_runtime import top_k

__all__ = [
    "HASH_MULTIPLIER",
    "ROUTER_HOST_SYNCS",
    "SCHEDULES",
    "SCORES",
    "BalancedRouter",
    "apply_capacity",
    "capacity",
    "route_deterministic",
    "route_dynamic_k",
    "route_expert_choice",
    "route_group_limited",
    "route_soft",
    "route_top_k_temperature",
    "router_jitter",
    "schedule_value",
    "token_positions",
    "update_balance_bias",
]

# Host synchronisations (``.item()``, ``.tolist()``, ``bool(tensor)``, data-dependent output
# shapes) per call.  ``route_deterministic`` makes one only for by="modality"/"task" with
# ``validate=True`` (the range check of the ids); by="hash" or ``validate=False`` make none.
ROUTER_HOST_SYNCS: dict[str, int] = {
    "route_expert_choice": 0,
    "route_dynamic_k": 0,
    "route_deterministic": 1,
    "route_soft": 0,
    "route_group_limited": 0,
    "update_balance_bias": 0,
    "apply_capacity": 0,
    "router_jitter": 0,
    "schedule_value": 0,
    "route_top_k_temperature": 0,
}

SCORES = ("softmax", "sigmoid")
SCHEDULES = ("constant", "linear", "cosine")

# Knuth's multiplicative hash constant: floor(2**32 / golden ratio), odd.
HASH_MULTIPLIER = 2654435761

# Relative slack when rounding capacities up, so that e.g. 1.1 * 30 / 3 (= 11.000000000000002
# in floating point) gives 11 rather than 12.
_CEIL_SLACK = 1e-9


# --------------------------------------------------------------------------- helpers


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name}: logits must be a [T, E] tensor, got {shape}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name}: logits must have at least one expert column, got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{name}: logits must be floating point, got {logits.dtype}")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scores(name: str, logits: Tensor, score: str) -> Tensor:
    """softmax / sigmoid of the logits in fp32 (fp64 for fp64 logits)."""
    logits = logits.to(_score_dtype(logits.dtype))
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"{name}: unknown score {score!r} (expected one of {SCORES})")


def capacity(capacity_factor: float, tokens: int, num_experts: int, k: int = 1) -> int:
    """``ceil(capacity_factor * tokens * k / num_experts)`` (with a 1e-9 relative slack)."""
    x = capacity_factor * tokens * k / num_experts
    return max(0, math.ceil(x - _CEIL_SLACK * max(1.0, abs(x))))


# --------------------------------------------------------------------------- expert choice


def route_expert_choice(
    logits: Tensor,
    capacity_factor: float,
    score: str = "softmax",
    group_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

    ``probs = softmax(logits)`` over the experts of each token (or ``sigmoid``).  The T tokens
    are split into routing groups of ``group_size`` consecutive tokens (default: one group of
    all T tokens); the last group may be shorter (it is padded with ``-inf`` scores, which are
    never picked).  Within a group of ``n`` tokens every expert picks the ``C`` tokens with the
    highest ``probs[t, e]``, ``C = clamp(ceil(capacity_factor * n / E), 1, n)`` (computed per
    group, so a short last group gets a proportionally smaller capacity).  A token can be
    picked by 0..E experts.

    Returns ``(weights[T, E], expert_ids[T, E], probs[T, E])`` with K = E slots: slot ``e`` holds
    ``e`` and ``probs[t, e]`` if expert ``e`` picked token ``t``, else ``-1`` and ``0``.
    Weights are differentiable w.r.t. the logits (they are the gathered probs).  Ties between
    equal scores are broken by ``torch.topk`` along the token axis (each expert still picks
    exactly C tokens).

    NOT CAUSAL: whether token ``t`` is picked depends on the scores of every other token of its
    group, including later ones, so expert-choice cannot be used as-is for autoregressive
    decoding (it needs e.g. an auxiliary causal router at inference, or group_size=1, which
    degenerates to "every expert picks the token" when C >= 1).
    """
    _check_logits("route_expert_choice", logits)
    if not capacity_factor > 0:
        raise ValueError(f"route_expert_choice: capacity_factor must be > 0, got {capacity_factor}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"route_expert_choice: group_size must be a positive int or None, got {group_size!r}")
    probs = _scores("route_expert_choice", logits, score)
    T, E = probs.shape
    expert_arange = torch.arange(E, device=probs.device)
    if T == 0:
        return probs.clone(), torch.empty(0, E, dtype=torch.long, device=probs.device), probs

    G = T if group_size is None else min(group_size, T)
    n_groups = -(-T // G)
    last = T - (n_groups - 1) * G

    def cap(n: int) -> int:
        return min(max(capacity(capacity_factor, n, E), 1), n)

    c_full, c_last = cap(G), cap(last)
    pad = n_groups * G - T
    sel = probs.detach()
    if pad:
        sel = torch.cat([sel, sel.new_full((pad, E), float("-inf"))])
    sel = sel.view(n_groups, G, E)
    top = torch.topk(sel, c_full, dim=1).indices  # [n_groups, c_full, E], token index in group
    rank = torch.arange(c_full, device=probs.device).view(1, c_full, 1)
    keep = (rank < c_full).expand(n_groups, c_full, E).clone()
    keep[-1] = rank[0] < c_last  # the short last group keeps fewer (never the -inf padding)
    picked = torch.zeros(n_groups, G, E, dtype=torch.bool, device=probs.device)
    picked.scatter_(1, top, keep)
    picked = picked.view(n_groups * G, E)[:T]

    weights = torch.where(picked, probs, torch.zeros_like(probs))
    expert_ids = torch.where(picked, expert_arange.expand(T, E), torch.full_like(picked, -1, dtype=torch.long))
    return weights, expert_ids, probs


# --------------------------------------------------------------------------- dynamic k


def route_dynamic_k(
    logits: Tensor,
    threshold: float,
    k_min: int = 1,
    k_max: int | None = None,
    score: str = "softmax",
    renormalize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic-k ("top-p", confidence-based) routing.

    ``probs`` are sorted in descending order (stable sort: ties keep the lower expert id
    first); each token keeps the smallest prefix whose cumulative probability is
    ``>= threshold`` -- i.e. the experts ``j`` whose *exclusive* prefix sum
    ``sum_{i<j} sorted[i]`` is ``< threshold`` -- and that count is clamped to
    ``[k_min, k_max]``.  ``threshold = 0`` keeps ``k_min`` experts; ``threshold = 1`` keeps
    every expert until the (floating point) cumulative sum reaches 1, then clamps to ``k_max``.

    Returns ``(weights[T, K], expert_ids[T, K], probs[T, E])`` with ``K = k_max`` (default E):
    kept slots hold the expert ids in descending probability order and their probabilities
    (divided by the kept sum if ``renormalize``); the rest are ``-1`` / ``0``.
    """
    _check_logits("route_dynamic_k", logits)
    E = logits.shape[1]
    k_max = E if k_max is None else k_max
    if not 0 <= k_min <= k_max <= E:
        raise ValueError(f"route_dynamic_k: need 0 <= k_min ({k_min}) <= k_max ({k_max}) <= E ({E})")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"route_dynamic_k: threshold must be in [0, 1], got {threshold}")
    probs = _scores("route_dynamic_k", logits, score)
    K = k_max
    vals, idx = top_k(probs, K)
    csum = vals.detach().cumsum(dim=-1)
    exclusive = torch.cat([torch.zeros_like(csum[:, :1]), csum[:, :-1]], dim=-1)
    n_keep = (exclusive < threshold).sum(dim=-1).clamp(min=k_min, max=k_max)
    kept = torch.arange(K, device=probs.device).unsqueeze(0) < n_keep.unsqueeze(1)
    weights = torch.where(kept, vals, torch.zeros_like(vals))
    if renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    expert_ids = torch.where(kept, idx, torch.full_like(idx, -1))
    return weights, expert_ids, probs


# --------------------------------------------------------------------------- deterministic


def _id_tensor(name: str, what: str, value, num_tokens: int, device) -> Tensor:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.full((num_tokens,), value, dtype=torch.long, device=device)
    if not isinstance(value, Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
        raise ValueError(f"{name}: {what} must be an int or an integer tensor of shape [{num_tokens}]")
    if value.dim() == 0:
        value = value.expand(num_tokens)
    if tuple(value.shape) != (num_tokens,):
        raise ValueError(f"{name}: {what} must have shape [{num_tokens}], got {tuple(value.shape)}")
    return value.long()


def _knuth_hash_expert(key: Tensor, num_experts: int) -> Tensor:
    """``((key mod 2**32) * 2654435761 mod 2**32) * E >> 32`` in int64 arithmetic, no overflow."""
    k32 = key.long() & 0xFFFFFFFF
    lo, hi = k32 & 0xFFFF, k32 >> 16  # lo*M, hi*M < 2**48
    h = (lo * HASH_MULTIPLIER + (((hi * HASH_MULTIPLIER) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return (h * num_experts) >> 32  # multiply-shift range reduction: uses the high bits of h


def token_positions(x: Tensor) -> Tensor:
    """The position of every token of x [..., S, d] in its sequence (along dim -2), flattened to
    [N] like the rows of ``x.reshape(-1, d)``: the key of hash routing."""
    seq = x.shape[-2] if x.dim() >= 2 else 1
    return torch.arange(seq, device=x.device).repeat(math.prod(x.shape[:-2]))


def route_deterministic(
    num_tokens: int,
    num_experts: int,
    *,
    by: str,
    modality: Tensor | int | None = None,
    task: Tensor | int | None = None,
    positions: Tensor | None = None,
    token_ids: Tensor | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Routing without a learned router.  K = 1, weight 1.0, ``probs`` one-hot (fp32).

    * ``by="modality"``: expert = ``modality[t]`` (an int tensor [T], or one int for all).
    * ``by="task"``: expert = ``task[t]`` (an int tensor [T], a 0-d tensor or one int).
    * ``by="hash"``: expert = a fixed hash of ``token_ids[t]`` if given, else of
      ``positions[t]`` (default ``arange(T)``): Knuth's multiplicative hash
      ``h = (key mod 2**32) * 2654435761 mod 2**32`` followed by the multiply-shift range
      reduction ``expert = (h * E) >> 32`` (i.e. ``floor(h * E / 2**32)``, which uses the high,
      well-mixed bits of ``h`` -- ``h mod E`` would reuse the low bits of the key when E is a
      power of two).  Computed in int64 without overflow; identical on every device and run.

    Modality / task ids must lie in ``[0, E)`` (so E must be at least the number of modalities
    or tasks): with ``validate=True`` an out-of-range id raises ``ValueError``, which costs one
    host sync (none while torch.compile or torch.export traces: the check is skipped);
    ``validate=False`` skips the check (0 syncs; out-of-range ids then fail or
    misbehave downstream).  ``by="hash"`` never syncs.
    """
    name = "route_deterministic"
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"{name}: num_tokens must be an int >= 0, got {num_tokens!r}")
    if not isinstance(num_experts, int) or not 1 <= num_experts < 2**31:
        raise ValueError(f"{name}: num_experts must be an int in [1, 2**31), got {num_experts!r}")
    T, E = num_tokens, num_experts
    device = None
    for t in (modality, task, positions, token_ids):
        if isinstance(t, Tensor):
            device = t.device
            break
    if by in ("modality", "task"):
        value = modality if by == "modality" else task
        if value is None:
            raise ValueError(f"{name}: by={by!r} needs `{by}`")
        ids = _id_tensor(name, by, value, T, device)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < E:
                raise ValueError(f"{name}: {by} id {value} out of range [0, {E}) for {E} experts")
        elif (validate and T > 0 and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
              and bool(((ids < 0) | (ids >= E)).any())):
            raise ValueError(
                f"{name}: {by} ids must lie in [0, {E}) (one expert per {by}; {E} experts), got ids in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
    elif by == "hash":
        if token_ids is not None:
            key = _id_tensor(name, "token_ids", token_ids, T, device)
        elif positions is not None:
            key = _id_tensor(name, "positions", positions, T, device)
        else:
            key = torch.arange(T, device=device)
        ids = _knuth_hash_expert(key, E)
    else:
        raise ValueError(f"{name}: unknown by={by!r} (expected 'modality', 'task' or 'hash')")
    expert_ids = ids.view(T, 1)
    weights = torch.ones(T, 1, dtype=torch.float32, device=ids.device)
    probs = torch.zeros(T, E, dtype=torch.float32, device=ids.device)
    probs.scatter_(1, expert_ids.clamp(0, E - 1), 1.0)
    return weights, expert_ids, probs


# --------------------------------------------------------------------------- soft


def route_soft(logits: Tensor, score: str = "softmax") -> tuple[Tensor, Tensor, Tensor]:
    """Dense soft mixture: every token uses every expert.  K = E, ``expert_ids[t] = arange(E)``,
    ``weights = probs`` (the same tensor)."""
    _check_logits("route_soft", logits)
    probs = _scores("route_soft", logits, score)
    T, E = probs.shape
    expert_ids = torch.arange(E, device=probs.device).repeat(T, 1)
    return probs, expert_ids, probs


# --------------------------------------------------------------------------- group limited


def route_group_limited(
    logits: Tensor,
    k: int,
    num_groups: int,
    topk_groups: int,
    bias: Tensor | None = None,
    scale: float = 1.0,
    renormalize: bool = True,
    score: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3 group-limited top-k routing with an aux-loss-free balance bias.

    ``scores = sigmoid(logits)`` (or softmax); ``sel = scores + bias`` (bias [E], for selection
    only, e.g. maintained by ``update_balance_bias``).  The E experts form ``num_groups``
    consecutive groups of ``E / num_groups``; a group's score is the sum of its top-2 ``sel``
    values (its single value if groups have one expert); the ``topk_groups`` best groups are
    kept, the other experts' ``sel`` set to ``-inf``, and the top-``k`` experts of the masked
    ``sel`` are chosen (so ``k <= topk_groups * E / num_groups``).  Weights are gathered from the
    UNBIASED ``scores``, divided by their per-token sum (+1e-20) if ``renormalize``, times
    ``scale``.

    Returns ``(weights[T, k], expert_ids[T, k], probs=scores[T, E])``; ties to the lower id.
    Masked experts get ``-inf``, so a masked expert can never beat a kept expert whose biased score
    is negative; transformers' ``DeepseekV3TopkRouter`` does the same (checked with 5.24; older
    versions used ``0.0``). With sigmoid scores this is the same selection and the same weights as
    transformers' router (tests/test_interop_transformers.py checks both, per token).
    """
    name = "route_group_limited"
    _check_logits(name, logits)
    E = logits.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or E % num_groups:
        raise ValueError(
            f"{name}: num_groups={num_groups!r} must be a positive int dividing the number of experts E={E}"
        )
    group = E // num_groups
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"{name}: topk_groups={topk_groups} must be in [1, num_groups={num_groups}]")
    if not 0 <= k <= topk_groups * group:
        raise ValueError(
            f"{name}: k={k} must be in [0, topk_groups * E / num_groups = {topk_groups * group}]"
        )
    scores = _scores(name, logits, score)
    T = scores.shape[0]
    sel = scores.detach()
    if bias is not None:
        if tuple(bias.shape) != (E,):
            raise ValueError(f"{name}: bias must have shape [{E}], got {tuple(bias.shape)}")
        sel = sel + bias.detach().to(device=sel.device, dtype=sel.dtype)
    grouped = sel.view(T, num_groups, group)
    group_scores = torch.topk(grouped, min(2, group), dim=-1).values.sum(dim=-1)
    best = top_k(group_scores, topk_groups)[1]
    group_keep = torch.zeros(T, num_groups, dtype=torch.bool, device=sel.device).scatter_(1, best, True)
    masked = grouped.masked_fill(~group_keep.unsqueeze(-1), float("-inf")).view(T, E)
    expert_ids = top_k(masked, k)[1]
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights = weights * scale
    return weights, expert_ids, scores


def update_balance_bias(bias: Tensor, expert_counts: Tensor, rate: float) -> Tensor:
    """Aux-loss-free load balancing (DeepSeek-V3): ``bias += rate * sign(mean(counts) - counts)``.

    Under-loaded experts get a higher selection bias, over-loaded ones a lower one.  Updates
    ``bias`` in place without recording gradients and returns it.
    """
    if tuple(expert_counts.shape) != tuple(bias.shape):
        raise ValueError(
            f"update_balance_bias: expert_counts {tuple(expert_counts.shape)} != bias {tuple(bias.shape)}"
        )
    with torch.no_grad():
        counts = expert_counts.to(device=bias.device, dtype=_score_dtype(bias.dtype))
        step = torch.sign(counts.mean() - counts) * rate
        bias.add_(step.to(bias.dtype))
    return bias


# --------------------------------------------------------------------------- capacity


def apply_capacity(
    weights: Tensor,
    expert_ids: Tensor,
    num_experts: int,
    capacity_factor: float,
    policy: str = "position",
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice capacity: each expert keeps at most ``C`` of its (token, slot) assignments.

    ``C = ceil(capacity_factor * T * K / E)`` with ``K = expert_ids.shape[1]`` the routing width.
    Assignments already dropped (``-1``) are ignored; ids must lie in ``[-1, E)`` (unchecked).

    * ``policy="position"`` (Switch / GShard priority): assignments are ranked slot-major --
      every token's slot-0 assignment first, in token order, then every slot-1 assignment in
      token order, and so on -- and each expert keeps its first C.
    * ``policy="probability"``: each expert keeps the C assignments with the largest weights;
      equal weights are ranked by the "position" order.

    Returns ``(weights, expert_ids, dropped_count)``: dropped slots get id ``-1`` and weight 0
    (kept weights keep their gradient), ``dropped_count`` is a 0-d int64 tensor (no host sync)
    counting the assignments dropped by this call.
    """
    name = "apply_capacity"
    if expert_ids.dim() != 2 or tuple(weights.shape) != tuple(expert_ids.shape):
        raise ValueError(
            f"{name}: weights {tuple(weights.shape)} and expert_ids {tuple(expert_ids.shape)} must both be [T, K]"
        )
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{name}: num_experts must be a positive int, got {num_experts!r}")
    if not capacity_factor > 0:
        raise ValueError(f"{name}: capacity_factor must be > 0, got {capacity_factor}")
    if policy not in ("position", "probability"):
        raise ValueError(f"{name}: unknown policy {policy!r} (expected 'position' or 'probability')")
    T, K = expert_ids.shape
    E = num_experts
    C = capacity(capacity_factor, T, E, K)
    N = T * K
    device = expert_ids.device
    ids = expert_ids.long()
    flat = ids.t().reshape(-1)  # slot-major priority order: index j * T + t
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)  # dropped slots -> bin E
    if policy == "probability":
        w_flat = weights.detach().t().reshape(-1)
        by_weight = torch.sort(w_flat, descending=True, stable=True).indices
        order = by_weight.index_select(0, torch.argsort(key.index_select(0, by_weight), stable=True))
    else:
        order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    starts = counts.cumsum(0) - counts
    sorted_key = key.index_select(0, order)
    rank_sorted = torch.arange(N, device=device) - starts.index_select(0, sorted_key)
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    keep_flat = (rank < C) & (key < E)
    keep = keep_flat.view(K, T).t()
    valid = ids >= 0
    new_weights = torch.where(keep, weights, torch.zeros_like(weights))
    new_ids = torch.where(keep, ids, torch.full_like(ids, -1))
    dropped = (valid & ~keep).sum()
    return new_weights, new_ids, dropped


# --------------------------------------------------------------------------- training helpers


def router_jitter(x: Tensor, eps: float, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Switch-Transformer router input jitter: ``x * U(1 - eps, 1 + eps)`` elementwise when
    ``training`` and ``eps > 0``; otherwise ``x`` itself.  ``generator`` makes it reproducible."""
    if eps < 0:
        raise ValueError(f"router_jitter: eps must be >= 0, got {eps}")
    if not training or eps == 0:
        return x
    noise = torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps, generator=generator)
    return x * noise


def schedule_value(kind: str, step: int, total: int, start: float, end: float) -> float:
    """A scalar schedule (e.g. a gate temperature or threshold for dense-to-sparse training).

    ``p = clamp(step / total, 0, 1)`` (``p = 1`` when ``total <= 0``):

    * ``"constant"``: ``start``.
    * ``"linear"``: ``start + (end - start) * p``.
    * ``"cosine"``: ``end + (start - end) * (1 + cos(pi * p)) / 2`` -- a half-cosine from
      ``start`` (step 0) to ``end`` (step ``total``), constant ``end`` after.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule_value: unknown kind {kind!r} (expected one of {SCHEDULES})")
    if kind == "constant":
        return float(start)
    p = 1.0 if total <= 0 else min(max(step / total, 0.0), 1.0)
    if kind == "linear":
        return float(start + (end - start) * p)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))


class Schedule(nn.Module):
    """A scalar that follows ``schedule_value(kind, step, steps, start, end)`` over training steps.

    ``model.after_step()`` calls ``advance()``; calling the module gives the current value. The
    step is a Python int (no device sync to read it), saved in the state dict as extra state, so
    training resumes where it stopped."""

    def __init__(self, kind: str, start: float, end: float, steps: int):
        super().__init__()
        if kind not in SCHEDULES:
            raise ValueError(f"Schedule: unknown kind {kind!r} (expected one of {SCHEDULES})")
        self.kind, self.start, self.end, self.steps = kind, float(start), float(end), int(steps)
        self.step = 0

    def forward(self) -> float:
        return schedule_value(self.kind, self.step, self.steps, self.start, self.end)

    def advance(self) -> None:
        self.step += 1

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return f"{self.kind} {self.start} -> {self.end} over {self.steps} steps, at step {self.step}"


def route_top_k_temperature(
    logits: Tensor, k: int, temperature: float, renormalize: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing on a tempered softmax: ``probs = softmax(logits / temperature)``.

    A high temperature flattens the gate towards dense uniform mixing, a low one sharpens it
    (annealed dense-to-sparse gates; use ``schedule_value`` for the temperature).  Returns
    ``(weights[T, k], expert_ids[T, k], probs[T, E])`` with the weights gathered from the
    tempered probs (renormalised over the k if asked); ties to the lower id.
    """
    _check_logits("route_top_k_temperature", logits)
    E = logits.shape[1]
    if not 0 <= k <= E:
        raise ValueError(f"route_top_k_temperature: k={k} must be in [0, {E}]")
    if not temperature > 0:
        raise ValueError(f"route_top_k_temperature: temperature must be > 0, got {temperature}")
    probs = torch.softmax(logits.to(_score_dtype(logits.dtype)) / temperature, dim=-1)
    expert_ids = top_k(probs.detach(), k)[1]
    weights = probs.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids, probs


class BalancedRouter(nn.Linear):
    """A router gate with DeepSeek-V3's selection-only balancing bias ``score_bias`` [E].

    In training, ``observe(expert_ids)`` counts the tokens routed to each expert; the training
    loop's ``model.after_step()`` calls ``update_bias()``, which applies ``update_balance_bias``
    with ``rate`` and clears the counts. Under ``torch.distributed`` (data or expert parallel) the
    counts are summed over every rank first, so each rank applies the same update from the global
    batch. The bias is a buffer: saved in the state dict, never trained by gradients."""

    def __init__(self, dim: int, num_experts: int, rate: float):
        super().__init__(dim, num_experts, bias=False)
        self.rate = rate
        self.register_buffer("score_bias", torch.zeros(num_experts))
        self.register_buffer("routed", torch.zeros(num_experts), persistent=False)

    def observe(self, expert_ids: Tensor, token_mask: Tensor | None = None) -> None:
        """Counts the routed (token, slot) pairs per expert (in training); tokens outside
        ``token_mask`` ([T] bool, the static form's group or depth mask) are not counted."""
        if self.training:
            with torch.no_grad():
                if token_mask is not None:
                    expert_ids = expert_ids.masked_fill(~token_mask.unsqueeze(1), -1)
                valid = expert_ids.reshape(-1)
                valid = valid[valid >= 0]
                self.routed.index_add_(0, valid, torch.ones_like(valid, dtype=self.routed.dtype))

    def update_bias(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.routed)  # every rank's tokens: one bias on every rank
        if self.routed.sum() > 0:
            update_balance_bias(self.score_bias, self.routed, self.rate)
        self.routed.zero_()
