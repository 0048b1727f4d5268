"""moec expert-parallel (EP) runtime: MoE expert layers whose experts are spread over ranks.

Ships next to generated model code, beside ``moec_runtime.py`` (whose activations it shares);
otherwise it depends only on ``torch`` and the standard library, never on ``moec``.

A placement plan (``moec place ... -o plan.json``, ``Plan.to_json()``) gives, per MoE layer,
``phy2log``: the logical expert of each physical slot.  With ``P = len(phy2log)`` slots over
``W`` ranks, rank ``j`` holds slots ``j*S .. (j+1)*S - 1`` (``S = P / W``, device-major).  A logical
expert held by several slots has replicas: identical copies of its weights, each serving a share of
its tokens.  Modality groups (MoMa) are contiguous ranges of a layer's logical experts; each group is
its own ``moe_experts`` call in generated code, so each group gets its own
``ExpertParallelExperts(..., experts=(start, size))`` built from the layer's ``phy2log``, and the
``expert_ids`` passed to ``moe_experts_ep`` are then group-local (``0 .. size-1``), exactly as for
the single-device ``moe_experts``.

Public API
----------
``ExpertParallelExperts(phy2log, rank, world_size, dim, hidden, glu, bias=False, experts=None)``
    An ``nn.Module`` holding only this rank's physical slots (of the group ``experts = (start, size)``
    of the layer; default: all logical experts) with the parameters of ``moec_runtime.Experts`` but
    ``L = len(local_slots)`` rows instead of ``E``: ``up_proj`` / ``gate_proj`` ``[L, dim, hidden]``,
    ``down_proj [L, hidden, dim]``, ``up_bias`` / ``gate_bias [L, hidden]``, ``down_bias [L, dim]``.
    ``L`` may be 0 (no slot of this group on this rank).  Initialisation consumes the global RNG
    exactly like ``Experts(num_experts=size, ...)`` (the full ``[size, ...]`` tensors are drawn, then
    this rank's rows are copied out), so a rank model built under ``torch.manual_seed(s)`` has the
    same dense weights as the single-device model and the expert weights of ``load_from_full`` of
    the single-device model's experts.
    ``.from_plan(plan, layer, rank, world_size, dim, hidden, glu, bias=False, experts=None)``: reads
    ``phy2log`` of ``plan["layers"][i]`` (``layer`` = the layer's ``name``, e.g. ``"layers.1.moe"``,
    or its position ``i`` in ``plan["layers"]``) and checks ``plan["num_devices"] == world_size``.
    ``.load_from_full(full_state)``: copy rows from the single-device ``Experts`` tensors
    (``{"up_proj": [size, dim, hidden], ...}``, e.g. ``Experts.state_dict()``); every replica gets a
    copy.  ``.full_state(group=None)``: the inverse (``[size, ...]`` tensors; an all-reduce over the
    group, replicas averaged).  ``.full_grads(group=None, reduce=True)``: gradients as ``[size, ...]``
    tensors, replicas summed, all-reduced over the group (the gradient of the sum of all ranks'
    losses w.r.t. the logical experts).  ``.sync_replica_grads(group=None, scale=1.0)``: set every
    local slot's ``.grad`` to ``scale *`` its logical expert's ``full_grads`` row, so replicas stay
    identical after an optimizer step (``scale = 1 / world_size`` if dense gradients are averaged,
    as DDP does).  Buffers ``log2phy [size, R]`` (layer physical slots, -1 padded) and ``logcnt``.
    Replicas are only identical if every rank builds the module from the same RNG state (a fresh
    process has a random seed: seed identically, as ``Model(seed=...)`` does, or load a checkpoint)
    and their gradients are synchronised before each optimizer step.  Device ``j`` of the plan is
    rank ``j`` of ``group``.

``moe_experts_ep(x, expert_ids, weights, local, log2phy=None, logcnt=None, activation="silu",
group=None, expert_fn=None)`` -> ``Tensor[T, d]``
    Same contract as ``moec_runtime.moe_experts`` (``y[t] = sum_j weights[t, j] *
    FFN_{expert_ids[t, j]}(x[t])``, ``-1`` = dropped slot, fp32 combine with ``index_add_`` (fp64
    for fp64 x), result in ``x.dtype``, differentiable w.r.t. ``x``, ``weights`` and the local expert
    parameters) with the experts spread over the ranks of ``group`` (default: the default process
    group; world size 1 or no initialised process group: everything runs locally, no collective).
    ``log2phy`` / ``logcnt`` default to the module's buffers; if given (lists or tensors, indexed by
    the group-local expert id, values are the layer's physical slots) they must agree with the
    ``phy2log`` the module was built from (checked when given as lists).
    Every rank of the group must make the same sequence of ``moe_experts_ep`` calls (also with
    ``T = 0`` tokens) and, when training, run backward through all of them: the forward and the
    backward each contain collectives.
    ``expert_fn(rows, sizes, local, activation)`` optionally replaces the local grouped FFN: ``rows``
    are ``[M, d]`` sorted by local slot, ``sizes`` the host list of rows per local slot.

    Algorithm, per call (sender = the rank that owns the tokens, receiver = the rank that owns the
    slot):

    1. Replica choice (deterministic, balanced): token ``t`` (row of ``x`` on rank ``r``) routed to
       logical expert ``e`` uses replica ``(t + r) mod logcnt[e]`` of ``log2phy[e]``, so an expert's
       tokens alternate over its replicas and rank ``r``'s token 0 starts at replica ``r``.  The
       physical slot ``p`` gives the destination rank ``p // S`` and the local slot there.
    2. The (token, slot) pairs are sorted (stable) by (destination rank, local slot); dropped slots
       go last and are never sent.  The per-(rank, local slot) counts are exchanged with one
       ``all_to_all_single`` of an int64 ``[W, Lmax]`` tensor.
    3. One host sync: ``.tolist()`` of the concatenated send and receive counts.  All split sizes,
       the number of rows each rank receives and the per-slot sizes of the local FFN come from it.
    4. Dispatch: the token rows go out with ``all_to_all_single`` (uneven splits; a rank may send or
       receive nothing), wrapped in a ``torch.autograd.Function`` whose backward is the reverse
       all-to-all.  The receiver orders its rows by local slot (they arrive source-rank major), runs
       one matmul per non-empty local slot (the runtime's "split" grouped FFN), and restores arrival
       order.
    5. Combine: the results go back with the reverse all-to-all; the sender multiplies the routing
       weights in (fp32) and ``index_add_``s into ``y``.

    Under grad mode both all-to-all nodes are always recorded (inputs that do not require grad are
    made to), so every rank runs the same collectives in backward even when one rank holds no
    slots of a group or its ``x`` does not require grad; ``y`` therefore requires grad under grad
    mode (use ``torch.no_grad()`` for inference).

``all_to_all(x, out_splits, in_splits, group=None)``
    The differentiable uneven all-to-all of rows used above (``x`` itself without a process group).
    ``torch.distributed.nn.functional.all_to_all_single`` does the same on gloo in torch 2.13 but is
    deprecated (a ``FutureWarning`` per call), and ``torch.distributed._functional_collectives
    .all_to_all_single_autograd`` is private; this module uses its own ``autograd.Function`` over
    the public ``dist.all_to_all_single``.

``local_grouped_ffn(rows, sizes, local, activation)``: the default ``expert_fn``.

``HOST_SYNCS_EP = 1``: host synchronisations per ``moe_experts_ep`` call (the ``.tolist()`` of step
    3), with or without a process group; the collectives are 3 ``all_to_all_single`` in forward
    (counts, dispatch, combine) and 2 in backward.

``load_full_state_dict(model, state_dict, strict=True)``
    Load a single-device checkpoint into a rank model: ``ExpertParallelExperts`` submodules take
    their rows of the full expert tensors, everything else loads as usual.

``run_ranks(fn, world_size=2, *args, timeout=120.0)`` -> ``[fn(0, W, *args), ..., fn(W-1, W, *args)]``
    For tests and CPU demos: runs ``fn(rank, world_size, *args)`` in ``world_size`` processes
    (``torch.multiprocessing.spawn``) with an initialised gloo process group on 127.0.0.1 (a free
    port, 1 torch thread per process), returns the per-rank return values, re-raises a rank's
    exception (with its traceback) and kills all ranks after ``timeout`` seconds (``TimeoutError``).
    ``fn`` must be picklable (a module-level function).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # inside the moec package
    from .runtime import _activation
except ImportError:  # shipped next to generated code, beside moec_runtime.py
    from moec_runtime import _activation

__all__ = [
    "HOST_SYNCS_EP",
    "ExpertParallelExperts",
    "all_to_all",
    "load_full_state_dict",
    "local_grouped_ffn",
    "moe_experts_ep",
    "run_ranks",
]

HOST_SYNCS_EP = 1

_PARAM_NAMES = ("up_proj", "gate_proj", "down_proj", "up_bias", "gate_bias", "down_bias")


# --------------------------------------------------------------------------- process group helpers


def _world(group) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("moe_experts_ep: a process group was given but torch.distributed is not "
                               "initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` along dim 0 with uneven splits; backward = reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # grad is materialised (zeros) if the output's gradient is None, so every rank always runs
        # this collective; calling the Function again keeps double backward possible.
        return _AllToAll.apply(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Differentiable uneven ``all_to_all_single`` of the rows of ``x`` (``in_splits`` rows to each
    rank, ``out_splits`` rows from each rank); returns ``x`` itself without a process group."""
    if _world(group)[1] == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# --------------------------------------------------------------------------- the local experts


def _ffn(xs, act, up, down, gate, ub, db, gb):
    u = xs @ up
    if ub is not None:
        u = u + ub
    if gate is not None:
        g = xs @ gate
        if gb is not None:
            g = g + gb
        h = act(g) * u
    else:
        h = act(u)
    y = h @ down
    if db is not None:
        y = y + db
    return y


def local_grouped_ffn(rows: Tensor, sizes: list[int], local: ExpertParallelExperts, activation: str) -> Tensor:
    """Rows sorted by local slot (``sizes[j]`` rows for slot j) through their slot's FFN; one ``mm``
    per non-empty slot.  With no rows, slot 0 runs on the empty slice so the parameters stay in the
    graph (zero gradients rather than None)."""
    act = _activation(activation, "moe_experts_ep")
    n_slots = len(sizes)
    if n_slots == 0:
        return rows[:0]  # no slot here, so no rows either; keeps the result connected to `rows`
    params = [getattr(local, name) for name in _PARAM_NAMES]
    outs = []
    for j, xe in enumerate(torch.split(rows, sizes)):
        if sizes[j] == 0 and not (j == 0 and rows.shape[0] == 0):
            continue
        up, gate, down, ub, gb, db = (None if p is None else p[j] for p in params)
        outs.append(_ffn(xe, act, up, down, gate, ub, db, gb))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class ExpertParallelExperts(nn.Module):
    """This rank's physical expert slots of one MoE layer (or one expert group of it)."""

    def __init__(self, phy2log: list[int], rank: int, world_size: int, dim: int, hidden: int, glu: bool,
                 bias: bool = False, experts: tuple[int, int] | None = None):
        super().__init__()
        phy2log = [int(e) for e in phy2log]
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ExpertParallelExperts: rank {rank} is not in [0, world_size={world_size})")
        if not phy2log or len(phy2log) % world_size:
            raise ValueError(f"ExpertParallelExperts: {len(phy2log)} physical slots do not divide evenly over "
                             f"{world_size} ranks")
        if min(phy2log) < 0:
            raise ValueError("ExpertParallelExperts: phy2log entries must be logical expert ids >= 0")
        start, size = (0, max(phy2log) + 1) if experts is None else (int(experts[0]), int(experts[1]))
        if start < 0 or size < 1:
            raise ValueError(f"ExpertParallelExperts: invalid expert range {experts!r}")
        logcnt = [0] * size
        for e in phy2log:
            if start <= e < start + size:
                logcnt[e - start] += 1
        missing = [start + i for i, c in enumerate(logcnt) if c == 0]
        if missing:
            raise ValueError(f"ExpertParallelExperts: logical experts {missing} have no physical slot in "
                             "phy2log")
        n_phys = len(phy2log)
        per_rank = n_phys // world_size
        self.rank, self.world_size = rank, world_size
        self.num_experts, self.expert_start = size, start
        self.dim, self.hidden, self.glu, self.bias = dim, hidden, glu, bias
        self.slots_per_rank = per_rank  # S: the layer's physical slots per rank (all groups)
        # Per rank: the layer's physical slots holding an expert of this group, in slot order.
        group_slots = [[p for p in range(j * per_rank, (j + 1) * per_rank) if start <= phy2log[p] < start + size]
                       for j in range(world_size)]
        self.local_slots = group_slots[rank]  # physical slot ids held here
        self.local_experts = [phy2log[p] - start for p in self.local_slots]  # group-local expert of each
        self.max_local_slots = max(len(s) for s in group_slots)  # Lmax, the same on every rank
        slot_rank = [p // per_rank for p in range(n_phys)]
        slot_local = [-1] * n_phys
        for slots in group_slots:
            for i, p in enumerate(slots):
                slot_local[p] = i
        replicas: list[list[int]] = [[] for _ in range(size)]
        for p, e in enumerate(phy2log):
            if start <= e < start + size:
                replicas[e - start].append(p)
        width = max(logcnt)
        self._phy2log = phy2log
        self.register_buffer("log2phy", torch.tensor([r + [-1] * (width - len(r)) for r in replicas],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("logcnt", torch.tensor(logcnt, dtype=torch.long), persistent=False)
        self.register_buffer("slot_rank", torch.tensor(slot_rank, dtype=torch.long), persistent=False)
        self.register_buffer("slot_local", torch.tensor(slot_local, dtype=torch.long), persistent=False)
        self.register_buffer("local_expert_ids", torch.tensor(self.local_experts, dtype=torch.long),
                             persistent=False)

        # Draw the full [size, ...] tensors exactly as moec_runtime.Experts does (same RNG stream),
        # then keep this rank's rows.
        idx = self.local_expert_ids

        def weight(n_in: int, n_out: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(n_in)
            full = torch.empty(size, n_in, n_out).uniform_(-bound, bound)
            return nn.Parameter(full.index_select(0, idx))

        def bias_(n_in: int, n_out: int) -> nn.Parameter | None:
            if not bias:
                return None
            bound = 1.0 / math.sqrt(n_in)
            full = torch.empty(size, n_out).uniform_(-bound, bound)
            return nn.Parameter(full.index_select(0, idx))

        self.up_proj = weight(dim, hidden)
        self.gate_proj = weight(dim, hidden) if glu else None
        self.down_proj = weight(hidden, dim)
        self.up_bias = bias_(dim, hidden)
        self.gate_bias = bias_(dim, hidden) if glu else None
        self.down_bias = bias_(hidden, dim)

    @classmethod
    def from_plan(cls, plan: dict, layer: int | str, rank: int, world_size: int, dim: int, hidden: int,
                  glu: bool, bias: bool = False, experts: tuple[int, int] | None = None) -> ExpertParallelExperts:
        """Build from a placement plan (``Plan.to_json()``); ``layer``: the layer's name or position."""
        if plan.get("num_devices", world_size) != world_size:
            raise ValueError(f"the plan places experts on {plan['num_devices']} devices, but world_size is "
                             f"{world_size}")
        layers = plan["layers"]
        if isinstance(layer, str):
            found = [lp for lp in layers if lp.get("name") == layer]
            if not found:
                names = ", ".join(str(lp.get("name")) for lp in layers)
                raise KeyError(f"no MoE layer {layer!r} in the plan (it has: {names})")
            entry = found[0]
        else:
            entry = layers[layer]
        return cls(entry["phy2log"], rank, world_size, dim, hidden, glu, bias, experts)

    def extra_repr(self) -> str:
        return (f"experts={self.expert_start}..{self.expert_start + self.num_experts - 1}, rank={self.rank}/"
                f"{self.world_size}, local_experts={self.local_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"glu={self.glu}, bias={self.bias}")

    def _params(self):
        return [(name, getattr(self, name)) for name in _PARAM_NAMES if getattr(self, name) is not None]

    @torch.no_grad()
    def load_from_full(self, full_state: dict) -> None:
        """Copy this rank's rows from the full ``[num_experts, ...]`` tensors of the single-device
        ``Experts`` (keys ``up_proj``, ``gate_proj``, ``down_proj``, ``*_bias``); replicas get copies."""
        for name, p in self._params():
            if name not in full_state:
                raise KeyError(f"load_from_full: missing {name!r}")
            full = full_state[name]
            if tuple(full.shape) != (self.num_experts,) + tuple(p.shape[1:]):
                raise ValueError(f"load_from_full: {name} must be {[self.num_experts, *p.shape[1:]]}, got "
                                 f"{list(full.shape)}")
            p.copy_(full.to(device=p.device, dtype=p.dtype).index_select(0, self.local_expert_ids.to(p.device)))

    def _to_full(self, tensors: dict, group, reduce: bool, average: bool) -> dict:
        out = {}
        counts = None
        for name, t in tensors.items():
            p = getattr(self, name)
            full = torch.zeros((self.num_experts,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
            if t is not None:
                full.index_add_(0, self.local_expert_ids.to(p.device), t.detach())
            if reduce and _world(group)[1] > 1:
                dist.all_reduce(full, group=group)
            if average:
                if counts is None:
                    counts = self.logcnt.to(device=p.device, dtype=p.dtype)
                full = full / counts.view((-1,) + (1,) * (full.dim() - 1))
            out[name] = full
        return out

    def full_state(self, group=None) -> dict:
        """The full ``[num_experts, ...]`` expert tensors (all-reduce over ``group``; replicas averaged)."""
        return self._to_full({n: p for n, p in self._params()}, group, reduce=True, average=True)

    def full_grads(self, group=None, reduce: bool = True) -> dict:
        """Gradients as ``[num_experts, ...]`` tensors: replicas summed, then summed over ``group``."""
        return self._to_full({n: p.grad for n, p in self._params()}, group, reduce=reduce, average=False)

    @torch.no_grad()
    def sync_replica_grads(self, group=None, scale: float = 1.0) -> None:
        """Give every local slot the gradient of its logical expert summed over all replicas and ranks."""
        full = self.full_grads(group)
        for name, p in self._params():
            p.grad = full[name].index_select(0, self.local_expert_ids.to(p.device)).mul_(scale)


def load_full_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a single-device state dict into a model whose expert modules are ``ExpertParallelExperts``
    (of this module or of the copy a generated model imports: recognised by ``load_from_full``)."""
    rest = dict(state_dict)
    ep_keys = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "load_from_full", None)):
            pre = f"{prefix}." if prefix else ""
            sub = {name: rest.pop(pre + name) for name, _ in module._params() if pre + name in rest}
            ep_keys.update(pre + name for name, _ in module._params())
            module.load_from_full(sub)
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if k not in ep_keys]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"load_full_state_dict: missing keys {missing}, unexpected keys "
                           f"{result.unexpected_keys}")
    return result


# --------------------------------------------------------------------------- dispatch / combine


def _table(t, like: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.long, device=like.device)


def _check_tables(local: ExpertParallelExperts, log2phy, logcnt) -> None:
    """Host-side consistency check of caller-given lists against the module's phy2log."""
    if isinstance(logcnt, (list, tuple)) and len(logcnt) != local.num_experts:
        raise ValueError(f"moe_experts_ep: logcnt has {len(logcnt)} entries, the module serves "
                         f"{local.num_experts} experts")
    if isinstance(log2phy, (list, tuple)):
        if len(log2phy) != local.num_experts:
            raise ValueError(f"moe_experts_ep: log2phy has {len(log2phy)} rows, the module serves "
                             f"{local.num_experts} experts (pass the rows of this expert group)")
        for e, row in enumerate(log2phy):
            n = int(logcnt[e]) if logcnt is not None else sum(1 for p in row if p >= 0)
            if n < 1 or any(local._phy2log[p] != local.expert_start + e for p in row[:n]):
                raise ValueError(f"moe_experts_ep: log2phy row {e} ({row[:n]}) does not match the module's "
                                 "phy2log")


def _check_inputs(x: Tensor, expert_ids: Tensor, weights: Tensor, local: ExpertParallelExperts) -> None:
    if x.dim() != 2 or x.shape[1] != local.dim:
        raise ValueError(f"moe_experts_ep: x must be [T, d={local.dim}], got {tuple(x.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts_ep: expert_ids must be [T={x.shape[0]}, k], got {tuple(expert_ids.shape)}")
    if weights.shape != expert_ids.shape:
        raise ValueError(f"moe_experts_ep: weights {tuple(weights.shape)} != expert_ids {tuple(expert_ids.shape)}")


def moe_experts_ep(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    local: ExpertParallelExperts,
    log2phy=None,
    logcnt=None,
    activation: str = "silu",
    group=None,
    expert_fn=None,
) -> Tensor:
    """Expert-parallel ``moe_experts``; see the module docstring for the contract and the algorithm."""
    _check_inputs(x, expert_ids, weights, local)
    rank, world = _world(group)
    if world != local.world_size or rank != local.rank:
        raise ValueError(f"moe_experts_ep: the module was built for rank {local.rank} of {local.world_size}, "
                         f"but this is rank {rank} of {world}")
    _activation(activation, "moe_experts_ep")  # fail early, the same on every rank
    if log2phy is not None or logcnt is not None:
        _check_tables(local, log2phy, logcnt)
    l2p = local.log2phy if log2phy is None else _table(log2phy, x)
    cnt = local.logcnt if logcnt is None else _table(logcnt, x)
    if log2phy is not None and logcnt is None:
        cnt = (l2p >= 0).sum(1)
    l2p, cnt = l2p.to(x.device), cnt.to(x.device)
    slot_rank, slot_local = local.slot_rank.to(x.device), local.slot_local.to(x.device)
    expert_fn = local_grouped_ffn if expert_fn is None else expert_fn

    T, d = x.shape
    k = expert_ids.shape[1]
    n_pairs = T * k
    lmax = local.max_local_slots
    n_bins = world * lmax

    # 1. replica choice and destination (rank, local slot) of every (token, slot) pair
    flat = expert_ids.reshape(-1).to(device=x.device, dtype=torch.long)
    tok = torch.div(torch.arange(n_pairs, device=x.device), max(k, 1), rounding_mode="floor")
    valid = flat >= 0
    e = flat.clamp_min(0)
    rep = torch.remainder(tok + rank, cnt.index_select(0, e))
    phys = l2p.reshape(-1).index_select(0, e * l2p.shape[1] + rep)
    key = slot_rank.index_select(0, phys) * lmax + slot_local.index_select(0, phys)
    key = torch.where(valid, key, torch.full_like(key, n_bins))  # dropped pairs: last bin, never sent

    # 2. sort by destination, count, exchange the counts
    counts = torch.zeros(n_bins + 1, dtype=torch.long, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    order = torch.argsort(key, stable=True)
    send_counts = counts[:n_bins]
    if world > 1:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
    else:
        recv_counts = send_counts

    # 3. the one host sync
    host = torch.cat([counts, recv_counts]).tolist()
    send_host, n_dropped, recv_host = host[:n_bins], host[n_bins], host[n_bins + 1:]
    in_splits = [sum(send_host[j * lmax:(j + 1) * lmax]) for j in range(world)]
    out_splits = [sum(recv_host[j * lmax:(j + 1) * lmax]) for j in range(world)]
    n_local = len(local.local_slots)
    slot_sizes = [sum(recv_host[j * lmax + i] for j in range(world)) for i in range(n_local)]
    n_send = n_pairs - n_dropped
    n_recv = sum(out_splits)

    order = order[:n_send]
    tok_sent = tok.index_select(0, order)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    row_w = weights.reshape(-1).index_select(0, order).to(acc_dtype)
    rows = x.index_select(0, tok_sent)

    # Under grad mode both all-to-alls must be recorded on every rank (their backward is a collective).
    grad_mode = torch.is_grad_enabled()
    if grad_mode and not rows.requires_grad:
        rows = rows.detach().requires_grad_()

    # 4. dispatch, local experts (rows arrive source-rank major; order them by local slot)
    recv = all_to_all(rows, out_splits, in_splits, group)
    sources = sum(1 for s in out_splits if s)
    if sources > 1 and n_local > 1:
        slot_of_row = torch.repeat_interleave(
            torch.arange(lmax, device=x.device).repeat(world), recv_counts, output_size=n_recv)
        perm = torch.argsort(slot_of_row, stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n_recv, device=x.device)
        ys = expert_fn(recv.index_select(0, perm), slot_sizes, local, activation).index_select(0, inv)
    else:
        ys = expert_fn(recv, slot_sizes, local, activation)
    if grad_mode and not ys.requires_grad:
        ys = ys.detach().requires_grad_()

    # 5. combine: back to the senders, routing weights in fp32, index_add_ into y
    back = all_to_all(ys, in_splits, out_splits, group)
    out = torch.zeros(T, d, dtype=acc_dtype, device=x.device)
    out.index_add_(0, tok_sent, back.to(acc_dtype) * row_w.unsqueeze(1))
    return out.to(x.dtype)


# --------------------------------------------------------------------------- launcher (tests, demos)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple, timeout: float) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    ok = False
    try:
        result = fn(rank, world_size, *args)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # complete or absent
        ok = True
    finally:
        if ok:
            dist.barrier()  # gloo may abort at exit if a peer tears down while a pair is still open
            dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    import torch.multiprocessing as mp

    for attempt in range(3):
        port = _free_port()
        with tempfile.TemporaryDirectory(prefix="moec-ep-") as out_dir:
            ctx = mp.spawn(_rank_main, args=(fn, world_size, port, out_dir, args, timeout),
                           nprocs=world_size, join=False)
            deadline = time.monotonic() + timeout
            paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
            try:
                while not ctx.join(timeout=0.2):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"run_ranks: {fn.__name__} did not finish on {world_size} ranks "
                                           f"within {timeout} s")
            except mp.ProcessExitedException as exc:
                # A rank killed by a signal after every rank stored its result (they do so before the
                # final barrier) crashed in gloo's teardown, not in `fn`: keep the results.
                if not all(os.path.exists(path) for path in paths):
                    raise
                warnings.warn(f"run_ranks: a rank crashed after finishing ({exc})", RuntimeWarning,
                              stacklevel=2)
            except mp.ProcessRaisedException as exc:
                port_taken = "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower()
                if port_taken and attempt < 2:
                    continue  # the free port was taken before rank 0 bound it; try another
                raise
            finally:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                    proc.join(timeout=5)
            return [torch.load(path, weights_only=False) for path in paths]
    raise AssertionError("unreachable")  # pragma: no cover
