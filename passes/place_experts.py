"""place-experts: put each MoE layer's routed experts (plus redundant replicas) on expert-parallel devices.

The problem, per MoE layer
--------------------------
E logical experts (modality groups are contiguous ranges of the layer's expert ids, in declaration
order), the expected load of each expert (tokens routed to it per step: a `moec train --profile`
routing profile, or uniform), its weight bytes, N devices and R redundant replicas. A plan has
P = E + R physical slots, S = P / N per device (P must divide evenly); slot j*S + r is device j's
r-th slot (EPLB's device-major numbering). Every logical expert has at least one replica, and a
replica carries load(expert) / replicas(expert): tokens are spread evenly over an expert's replicas.

Objectives, in order:
1. minimise the maximum device load (reported as max / mean device load; 1.0 is perfect);
2. respect the per-device memory limit (a hard constraint; it applies to the expert weights placed,
   summed over all MoE layers, so give the memory left after dense weights, KV cache and activations);
3. as secondary objectives that never cost balance: less all-to-all traffic, then each modality
   group's replicas on as few devices as possible (fewer dispatch destinations per token).

Traffic model
-------------
A token lives on a home device; sending it to an expert replica on another device costs d_model x
activation_bytes bytes to dispatch and the same again to combine. Tokens of a group are homed
uniformly over the group's home devices (every device unless `home_devices` says where that
modality's tokens live), independently of which replica serves them, so a replica with load w on
device d costs  w x (1 - [d is a home] / #homes) x d_model x activation_bytes x 2  bytes per step.
With uniform homes this is (N-1)/N of all routed traffic whatever the placement; with modality homes
(e.g. image tokens on devices 0-3) placing the group's experts on its home devices removes traffic.

Algorithms
----------
- `round_robin`: load-oblivious: replica t (t = 0..P-1) is logical expert t mod E on device t mod N.
- `eplb_baseline`: DeepSeek EPLB's global policy: greedy replication (each redundant replica goes to
  the expert with the highest load per replica) then balanced packing (replicas by load descending,
  each onto the least-loaded device that still has a free slot).
- `place`: (1) replication: EPLB's rule and Sainte-Lague/Webster's (load / (replicas - 0.5)),
  which splits fewer mid-sized experts into awkward half-device pieces; (2) packing: EPLB's LPT
  packing of each replication, the better one improved by pairwise swaps that lower the most loaded
  device (partners by bisection in each device's sorted loads), and, unless that is within 0.1% of
  a lower bound, a second packing by cardinality-constrained Karmarkar-Karp differencing + swaps;
  (3) locality, never costing balance: replicas of equal load are relabelled so each group fills
  consecutive devices (its home devices first), a group-by-group packing capped at the best maximum
  is tried (devices holding a replica heavier than half that maximum keep their balanced contents;
  not tried when that keeps most devices), and swaps between groups that keep every device under
  that maximum reduce traffic and devices per group. (4) Under a memory limit with experts of different sizes, a memory-only plan
  over all layers (largest replicas first onto the emptiest device, then exchanges) fixes each
  layer's budget, and every swap respects it. EPLB's own plan is the fallback if anything ends up
  worse, so `place` is never worse than `eplb_baseline` on max/mean load (exactly rounded sums).

Speed: pure Python; 256 experts x 64 devices x 61 layers takes about 20 ms (R = 0) to 70 ms
(R = 64) on one core, about 60 ms and 100 ms with two modality groups; EPLB about 15 ms
(`benchmarks/placement.py`).
"""

from __future__ import annotations

import bisect
import collections
import functools
import heapq
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import ClassVar

from moec.dsl.kinds import parse_bytes

from .manager import Pass, PassContext

__all__ = [
    "ExpertGroup",
    "LayerPlan",
    "LayerProblem",
    "PlaceExperts",
    "PlacementError",
    "PlacementProblem",
    "Plan",
    "eplb_baseline",
    "format_plan",
    "load_profile",
    "make_problem",
    "parse_bytes",
    "parse_modality_devices",
    "place",
    "problem_from_graph",
    "round_robin",
]


class PlacementError(ValueError):
    """The placement problem is invalid or has no solution (message says why and what to change)."""


def parse_modality_devices(text: str) -> dict[str, list[int]]:
    """'image=0-3,text=4-7;audio=2' -> {'image': [0, 1, 2, 3], 'text': [4, 5, 6, 7], 'audio': [2]}."""
    out: dict[str, list[int]] = {}
    for part in re.split(r"[,;]\s*(?=[A-Za-z_])", text.strip()):
        name, eq, spec = part.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise ValueError(f"invalid modality devices {part!r}: expected e.g. image=0-3,text=4-7")
        devs: list[int] = []
        for item in spec.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
            if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
                raise ValueError(f"invalid device list {spec!r} for {name.strip()}: "
                                 "expected e.g. 0-3 or 0,2,5")
            devs += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
        out[name.strip()] = sorted(set(out.get(name.strip(), []) + devs))
    return out


def _human_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ---- the problem ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertGroup:
    """Experts start .. start+size-1 of a layer, routed among the tokens of `modalities`."""

    name: str
    start: int
    size: int
    top_k: int = 1
    modalities: tuple[str, ...] = ()
    home_devices: tuple[int, ...] | None = None  # where this group's tokens live; None: all devices


@dataclass
class LayerProblem:
    layer: int  # IR layer index
    load: list[float]  # expected tokens per step, per logical expert
    expert_bytes: list[int]  # weight bytes per logical expert
    groups: list[ExpertGroup] = field(default_factory=list)  # empty: one group of all experts
    d_model: int = 0  # token width for all-to-all bytes (0: traffic not reported)
    name: str = ""  # e.g. "layers.3.moe"

    def __post_init__(self):
        if not self.groups:
            self.groups = [ExpertGroup("all", 0, len(self.load))]

    @property
    def num_experts(self) -> int:
        return len(self.load)


@dataclass
class PlacementProblem:
    layers: list[LayerProblem]
    num_devices: int
    redundant: int = 0  # redundant replicas per MoE layer
    memory_limit: int | None = None  # expert-weight bytes per device, over all MoE layers
    activation_bytes: int = 2  # bytes per activation element sent in all-to-all (bf16)


def make_problem(loads: list[list[float]], num_devices: int, redundant: int = 0, expert_bytes: int = 1,
                 group_sizes: list[int] | None = None, memory_limit: int | str | None = None,
                 d_model: int = 0,
                 home_devices: list[tuple[int, ...] | None] | None = None) -> PlacementProblem:
    """A problem from plain loads (one list per MoE layer), for tests, benchmarks and notebooks."""
    layers = []
    for i, load in enumerate(loads):
        sizes = list(group_sizes) if group_sizes else [len(load)]
        if sum(sizes) != len(load):
            raise PlacementError(f"group sizes {sizes} do not add up to the {len(load)} experts of layer {i}")
        groups, start = [], 0
        for j, size in enumerate(sizes):
            homes = tuple(home_devices[j]) if home_devices and home_devices[j] is not None else None
            groups.append(ExpertGroup(f"g{j}" if len(sizes) > 1 else "all", start, size, home_devices=homes))
            start += size
        layers.append(LayerProblem(i, [float(x) for x in load], [expert_bytes] * len(load), groups, d_model))
    mem = parse_bytes(memory_limit) if memory_limit is not None else None
    return PlacementProblem(layers, num_devices, redundant, mem)


def _validate(problem: PlacementProblem) -> None:
    n, r = problem.num_devices, problem.redundant
    if not isinstance(n, int) or n < 1:
        raise PlacementError(f"number of devices must be a positive integer, got {n!r}")
    if not isinstance(r, int) or r < 0:
        raise PlacementError(f"redundant replicas must be a non-negative integer, got {r!r}")
    for lp in problem.layers:
        e = lp.num_experts
        where = f"MoE layer {lp.name or lp.layer}"
        if e < 1:
            raise PlacementError(f"{where} has no experts")
        if len(lp.expert_bytes) != e:
            raise PlacementError(f"{where}: {len(lp.expert_bytes)} expert sizes for {e} experts")
        if not all(map(math.isfinite, lp.load)) or min(lp.load) < 0:
            raise PlacementError(f"{where}: expert loads must be finite and non-negative")
        if (e + r) % n:
            lo, hi = (e + r) // n * n - e, ((e + r) // n + 1) * n - e
            ok = f"{lo} or {hi}" if lo >= 0 else f"{hi}"
            raise PlacementError(f"{where}: {e} experts + {r} redundant replicas = {e + r} slots do not "
                                 f"divide evenly over {n} devices; use --redundant {ok} (or a device count "
                                 f"dividing {e + r})")
        start = 0
        for g in lp.groups:
            if g.start != start or g.size < 1:
                raise PlacementError(f"{where}: groups must be contiguous, non-empty expert ranges in order")
            start += g.size
            for d in g.home_devices or ():
                if not 0 <= d < n:
                    raise PlacementError(f"{where}: group {g.name} is homed on device {d}, but there are "
                                         f"only {n} devices")
        if start != e:
            raise PlacementError(f"{where}: groups cover {start} experts, the layer has {e}")
    if problem.memory_limit is not None:
        need = _memory_lower_bound(problem)
        if need > problem.memory_limit:
            slots = sorted({(lp.num_experts + r) // n for lp in problem.layers})
            raise PlacementError(
                f"memory limit {_human_bytes(problem.memory_limit)} per device is too small: the routed "
                f"experts need at least {_human_bytes(need)} per device ({len(problem.layers)} MoE layers, "
                f"{'/'.join(map(str, slots))} expert slots per device per layer, {r} redundant replicas per "
                f"layer); use more devices, fewer redundant replicas or a larger limit")


def _memory_lower_bound(problem: PlacementProblem) -> int:
    n, r = problem.num_devices, problem.redundant
    total = sum(sum(lp.expert_bytes) + r * min(lp.expert_bytes) for lp in problem.layers)
    # every device holds S slots per layer, at least the smallest expert each; one holds the largest
    per_device = sum((lp.num_experts + r) // n * min(lp.expert_bytes) for lp in problem.layers)
    largest = max((max(lp.expert_bytes) - min(lp.expert_bytes) for lp in problem.layers), default=0)
    return max(-(-total // n), per_device + largest)


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    layer: int
    name: str
    phy2log: list[int]  # logical expert of each physical slot; device j holds slots j*S .. (j+1)*S-1
    logcnt: list[int]  # replicas per logical expert
    device_load: list[float]
    memory_bytes: list[int]
    device_all_to_all_bytes: list[float]  # bytes per step received + sent back by each device's experts
    group_devices: dict[str, int]  # devices holding at least one replica of each group
    total_load: float = 0.0  # the layer's tokens per step (exactly rounded sum of the expert loads)

    @property
    def slots_per_device(self) -> int:
        return len(self.phy2log) // len(self.device_load)

    @property
    def device_of_slot(self) -> list[int]:
        s = self.slots_per_device
        return [p // s for p in range(len(self.phy2log))]

    def log2phy(self, width: int | None = None) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.logcnt]
        for p, e in enumerate(self.phy2log):
            out[e].append(p)
        width = max(self.logcnt) if width is None else width
        return [slots + [-1] * (width - len(slots)) for slots in out]

    @property
    def max_mean_load(self) -> float:
        mean = self.total_load / len(self.device_load)  # the same for every plan of the layer
        return max(self.device_load) / mean if mean > 0 else 1.0

    @property
    def all_to_all_bytes(self) -> float:
        return math.fsum(self.device_all_to_all_bytes)


@dataclass
class Plan:
    num_devices: int
    redundant: int
    method: str
    layers: list[LayerPlan]
    memory_limit: int | None = None
    solve_seconds: float = 0.0  # not in to_json(), so plans stay reproducible

    @property
    def max_mean_load(self) -> float:
        return max((lp.max_mean_load for lp in self.layers), default=1.0)

    @property
    def memory_bytes(self) -> list[int]:
        return [sum(lp.memory_bytes[d] for lp in self.layers) for d in range(self.num_devices)]

    @property
    def all_to_all_bytes_per_step(self) -> float:
        return math.fsum(lp.all_to_all_bytes for lp in self.layers)

    def to_json(self) -> dict:
        width = max((max(lp.logcnt) for lp in self.layers), default=1)
        mem = self.memory_bytes
        return {
            "num_devices": self.num_devices,
            "redundant": self.redundant,
            "method": self.method,
            "memory_limit": self.memory_limit,
            "memory_ok": self.memory_limit is None or max(mem, default=0) <= self.memory_limit,
            "layers": [{
                "layer": lp.layer,
                "name": lp.name,
                "phy2log": list(lp.phy2log),
                "log2phy": lp.log2phy(width),
                "logcnt": list(lp.logcnt),
                "device_of_slot": lp.device_of_slot,
                "device_load": list(lp.device_load),
                "max_mean_load": lp.max_mean_load,
                "memory_bytes": list(lp.memory_bytes),
                "all_to_all_bytes": lp.all_to_all_bytes,
                "device_all_to_all_bytes": list(lp.device_all_to_all_bytes),
                "group_devices": dict(lp.group_devices),
            } for lp in self.layers],
            "max_mean_load": self.max_mean_load,
            "memory_bytes": mem,
            "all_to_all_bytes_per_step": self.all_to_all_bytes_per_step,
        }


# ---- shared pieces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """What depends only on a layer's groups and the device count (shared by layers alike)."""

    group_of: list[int]  # group of each logical expert
    remote: list[list[float]]  # [group][device] -> fraction of the group's tokens not homed there
    tiebreak: list[tuple[float, int]]  # replication ties go to the groups in turn, by position
    dev_order: list[int]  # devices in the order the groups fill them


@functools.lru_cache(maxsize=64)
def _layout(groups: tuple[ExpertGroup, ...], n: int) -> _Layout:
    group_of = [gi for gi, g in enumerate(groups) for _ in range(g.size)]
    remote = []
    for g in groups:
        homes = set(g.home_devices) if g.home_devices else set(range(n))
        remote.append([1.0 - (1.0 / len(homes) if d in homes else 0.0) for d in range(n)])
    tiebreak = [((x - groups[gi].start) / groups[gi].size, gi) for x, gi in enumerate(group_of)]
    # a device goes to the group whose tokens it homes (lowest remote fraction), in declaration
    # order; without homes, natural order
    owner = [min(range(len(groups)), key=lambda g: (remote[g][d], g)) for d in range(n)]
    dev_order = sorted(range(n), key=lambda d: (owner[d], d))
    return _Layout(group_of, remote, tiebreak, dev_order)


def _evaluate(lp: LayerProblem, n: int, phy2log: list[int], act_bytes: int) -> LayerPlan:
    e = lp.num_experts
    s = len(phy2log) // n
    logcnt = [0] * e
    for x in phy2log:
        logcnt[x] += 1
    per_replica = [lp.load[x] / logcnt[x] if logcnt[x] else 0.0 for x in range(e)]
    layout = _layout(tuple(lp.groups), n)
    grp, remote = layout.group_of, layout.remote
    per_token = 2.0 * lp.d_model * act_bytes
    slot_load = [per_replica[x] for x in phy2log]
    slot_bytes = [lp.expert_bytes[x] for x in phy2log]
    slot_group = [grp[x] for x in phy2log]
    devices = [slice(d * s, (d + 1) * s) for d in range(n)]
    # exactly rounded: the same multiset always gives the same sum
    loads = [math.fsum(slot_load[sl]) for sl in devices]
    mem = [sum(slot_bytes[sl]) for sl in devices]
    traffic = [0.0] * n
    if per_token:
        traffic = [math.fsum(wi * remote[g][d] for wi, g in zip(slot_load[sl], slot_group[sl])) * per_token
                   for d, sl in enumerate(devices)]
    spread = [0] * len(lp.groups)
    for sl in devices:
        for g in set(slot_group[sl]):
            spread[g] += 1
    return LayerPlan(lp.layer, lp.name, list(phy2log), logcnt, loads, mem, traffic,
                     {g.name: c for g, c in zip(lp.groups, spread)}, math.fsum(lp.load))


def _replicate(load: list[float], redundant: int, tiebreak: list | None = None,
               offset: float = 0.0) -> tuple[list[int], list[int], bool]:
    """Greedy replication: each extra replica goes to the expert with the highest load / (replicas -
    offset). offset 0 is EPLB's rule (the highest load per replica: D'Hondt apportionment); offset
    0.5 is Sainte-Lague/Webster, which makes fewer replicas of mid-sized experts that are only a bit
    too heavy and so leaves fewer awkward half-device items to pack. Ties: lowest `tiebreak` (default
    the expert id, as EPLB). Returns (replicas per expert, logical expert of each replica in EPLB's
    physical order: experts 0..E-1, then the extra replicas in the order they were added, whether a
    pick had a rival of equal priority: without one, every tie-break gives the same result)."""
    cnt = [1] * len(load)
    order = list(range(len(load)))
    tb = tiebreak if tiebreak is not None else order
    heap = list(zip([-w / (1.0 - offset) for w in load], tb, order))
    heapq.heapify(heap)
    tied = False
    for _ in range(redundant):
        key, t, i = heap[0]
        if not tied and len(heap) > 1:  # the runner-up is a child of the top
            tied = heap[1][0] == key or (len(heap) > 2 and heap[2][0] == key)
        order.append(i)
        cnt[i] += 1
        heapq.heapreplace(heap, (-load[i] / (cnt[i] - offset), t, i))
    return cnt, order, tied


def _heaviest_first(w: list[float]) -> list[int]:
    """Item indices by weight descending; equal weights in index order."""
    return sorted(range(len(w)), key=[-x for x in w].__getitem__)


def _lpt(w: list[float], n: int, s: int, heaviest_first: list[int] | None = None) -> list[list[int]]:
    """EPLB's balanced packing: items by weight descending (stable), each onto the least-loaded
    device with a free slot (lowest index on ties). Returns the items of each device in order."""
    bins: list[list[int]] = [[] for _ in range(n)]
    if s == 1:  # EPLB keeps the identity when every device has one slot
        return [[i] for i in range(n)]
    order = heaviest_first if heaviest_first is not None else _heaviest_first(w)
    # the n heaviest go one per device, in device order (every device is empty and ties go low)
    for d, i in enumerate(order[:n]):
        bins[d].append(i)
    heap = [(w[i], d) for d, i in enumerate(order[:n])]
    heapq.heapify(heap)
    for i in order[n:]:
        load, d = heap[0]
        bins[d].append(i)
        if len(bins[d]) < s:
            heapq.heapreplace(heap, (load + w[i], d))
        else:
            heapq.heappop(heap)
    return bins


def _kk(w: list[float], n: int, s: int, heaviest_first: list[int]) -> list[list[int]]:
    """Balanced largest differencing (Karmarkar-Karp with equal cardinality): items sorted descending
    are cut into s blocks of n (one item per device); the two partial partitions with the largest
    spread are merged repeatedly, pairing the heaviest subsets of one with the lightest of the other."""
    order = heaviest_first
    heap = []
    for k in range(s):
        part = [(w[i], [i]) for i in order[k * n:(k + 1) * n]]  # already descending
        heap.append((-(part[0][0] - part[-1][0]), k, part))
    heapq.heapify(heap)
    tick = s
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(wa + wb, ia + ib) for (wa, ia), (wb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda t: -t[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tick, merged))
        tick += 1
    return [items for _, items in heap[0][2]]


def _sorted_bins(bins: list[list[int]], w: list[float],
                 lightest_first: list[int]) -> tuple[list[list[int]], list[list[float]]]:
    """Each device's items and their loads, ascending by load (one global sort)."""
    dev = [0] * len(w)
    for d, b in enumerate(bins):
        for i in b:
            dev[i] = d
    items: list[list[int]] = [[] for _ in bins]
    keys: list[list[float]] = [[] for _ in bins]
    for i in lightest_first:
        items[dev[i]].append(i)
        keys[dev[i]].append(w[i])
    return items, keys


def _load_lower_bound(w: list[float], n: int, s: int) -> float:
    """No packing of loads `w` onto n devices x s slots has a lower maximum: the mean, and the
    device holding the heaviest replica also holds s-1 others, at least the s-1 lightest."""
    lightest = heapq.nsmallest(s - 1, w) if s > 1 else []
    return max(math.fsum(w) / n, max(w, default=0.0) + math.fsum(lightest))


def _best_swap_in_memory(kd: list[float], on_d: list[int], ke: list[float], on_e: list[int], ld: float,
                         le: float, best: float, eps: float, ib: list[int], room_d: float,
                         room_e: float) -> tuple[float, int, int, float] | None:
    """The swap of a replica of device d with one of device e (each's loads ascending) that gives
    the lowest max(ld - x, le + x) below `best`, within both devices' free memory; None if none."""
    found = None
    gap = ld - le
    for ia in range(len(kd) - 1, -1, -1):  # heaviest first: stop once nothing on e is lighter
        wa = kd[ia]
        if wa - ke[0] <= eps:
            break
        for jj, wb in enumerate(ke):
            x = wa - wb
            if eps < x < gap - eps and max(ld - x, le + x) < best:
                a, b = on_d[ia], on_e[jj]
                if ib[b] - ib[a] <= room_d and ib[a] - ib[b] <= room_e:
                    best = max(ld - x, le + x)
                    found = (best, a, b, x)
    return found


def _refine_balance(bins: list[list[int]], w: list[float], lightest_first: list[int], ib: list[int] | None,
                    cap: list[float] | None, max_iters: int) -> None:
    """Pairwise swaps that lower the most loaded device, best swap first, until none helps.

    For the max device d and another device e with gap = L[d] - L[e], swapping a (on d) with b (on e)
    gives max(L[d] - x, L[e] + x) with x = w[a] - w[b]; it is best at x = gap / 2, so the partners
    of a worth trying on e are the two loads nearest w[a] - gap / 2 (bisection). Devices are tried
    from the lightest up and the scan stops once (L[d] + L[e]) / 2 cannot beat the best swap found.
    With memory caps (`ib` item bytes, `cap` per device), swaps must keep both devices within them."""
    n = len(bins)
    items, keys = _sorted_bins(bins, w, lightest_first)
    loads = [math.fsum(k) for k in keys]
    total = math.fsum(loads)
    eps = 1e-12 * max(total, 1e-300)
    s = len(w) // n  # replicas per device
    lower = _load_lower_bound(w, n, s)
    mem = [sum(ib[i] for i in b) for b in bins] if ib is not None else None
    ranked = sorted((ld, d) for d, ld in enumerate(loads))  # (load, device), kept sorted
    bisect_left = bisect.bisect_left
    for _ in range(max_iters):
        ld, d = ranked[-1]
        if ld <= lower + eps:
            break
        best, move = ld - eps, None
        kd, idd = keys[d], items[d]
        top = s - 1
        # a swap that takes d below the runner-up lowers the global max as far as one swap can
        enough = ranked[-2][0] if n > 1 else ld
        for le, e in ranked:  # d itself (and any device as loaded) ends the scan
            if (ld + le) / 2 >= best or (move is not None and best <= enough):
                break
            gap = ld - le
            half, hi = gap / 2, gap - eps
            ke = keys[e]
            k0 = ke[0]
            if mem is not None:
                swap = _best_swap_in_memory(kd, idd, ke, items[e], ld, le, best, eps, ib,
                                            cap[d] - mem[d], cap[e] - mem[e])
                if swap is not None:
                    best, a, b, x = swap
                    move = (a, b, e, x)
                continue
            for ia in range(top, -1, -1):  # heaviest first: stop once nothing on e is lighter
                wa = kd[ia]
                if wa - k0 <= eps:
                    break
                # the partners worth trying: the loads on e on either side of wa - half
                j = bisect_left(ke, wa - half)
                x = wa - ke[j - 1]
                if eps < x < hi and ld - x < best and le + x < best:
                    best, move = max(ld - x, le + x), (idd[ia], items[e][j - 1], e, x)
                if j < s:
                    x = wa - ke[j]
                    if eps < x < hi and ld - x < best and le + x < best:
                        best, move = max(ld - x, le + x), (idd[ia], items[e][j], e, x)
        if move is None:
            break
        a, b, e, x = move
        for dev, out, inn in ((d, a, b), (e, b, a)):
            k = items[dev].index(out)
            del items[dev][k], keys[dev][k]
            k = bisect.bisect_left(keys[dev], w[inn])
            items[dev].insert(k, inn)
            keys[dev].insert(k, w[inn])
            if mem is not None:
                mem[dev] += ib[inn] - ib[out]
        for dev, delta in ((d, -x), (e, x)):
            del ranked[bisect.bisect_left(ranked, (loads[dev], dev))]
            loads[dev] += delta
            bisect.insort(ranked, (loads[dev], dev))
    for d in range(n):  # the devices' replicas, lightest first
        bins[d][:] = items[d]


def _group_pack(w: list[float], grp: list[int], n_groups: int, n: int, s: int, cap: float,
                remote: list[list[float]], ib: list[int] | None,
                mcap: list[float] | None, start: list[list[int]], heaviest_first: list[int]) -> list[list[int]] | None:
    """The devices of `start` that hold replicas keep them (they are full); the other replicas go
    group by group (declaration order), heaviest replica first: onto a device this group already
    uses (the fullest that still fits under `cap`), else onto a fresh device (home devices first,
    then the emptiest, then the lightest). None when something does not fit, as soon as a device
    cannot be filled: every slot gets a replica, so a device with f free slots will carry at least
    the f lightest replicas not placed yet."""
    bins = [list(b) for b in start]
    loads = [math.fsum([w[i] for i in b]) for b in bins]
    mem = [sum(ib[i] for i in b) for b in bins] if ib is not None else [0] * n
    placed = {i for b in bins for i in b}
    by_group: list[list[int]] = [[] for _ in range(n_groups)]
    for i in heaviest_first:
        if i not in placed:
            by_group[grp[i]].append(i)
    rest = [w[i] for i in reversed(heaviest_first) if i not in placed]  # loads of the replicas not placed yet
    lightest = list(itertools.accumulate(rest[:s], initial=0.0))  # sums of the k lightest of them
    over = cap + 1e-9 * abs(cap)
    for g, mine in enumerate(by_group):
        rg = remote[g]
        open_: list[int] = []  # devices of this group with a free slot
        # the others with a free slot, most preferred first (they take no replica until opened)
        fresh = [e for *_, e in sorted((rg[e], len(bins[e]), loads[e], e) for e in range(n) if len(bins[e]) < s)]
        for i in mine:
            top = cap - w[i]
            bi = ib[i] if ib is not None else 0
            d, best = -1, None
            for e in open_:
                if loads[e] <= top and (mcap is None or mem[e] + bi <= mcap[e]):
                    key = (-len(bins[e]), -loads[e])
                    if best is None or key < best:
                        d, best = e, key
            if d < 0:
                d = next((e for e in fresh if loads[e] <= top and (mcap is None or mem[e] + bi <= mcap[e])), -1)
                if d < 0:
                    return None
                fresh.remove(d)
                open_.append(d)
            bins[d].append(i)
            loads[d] += w[i]
            mem[d] += bi
            if len(bins[d]) == s:
                open_.remove(d)
            k = bisect.bisect_left(rest, w[i])
            changed = k < s and (len(rest) <= s or rest[s] != w[i])  # the lightest few are others now
            del rest[k]
            if changed:
                lightest = list(itertools.accumulate(rest[:s], initial=0.0))
            for e in open_ + fresh if changed else (d,):  # the devices with free slots
                if loads[e] + lightest[min(s - len(bins[e]), len(rest))] > over:
                    return None
    return bins


def _relabel(bins: list[list[int]], w: list[float], grp: list[int], rank: list[int], dev_order: list[int],
             ib: list[int] | None = None) -> None:
    """Replicas of equal load (and equal bytes, under a memory limit) are interchangeable: give each
    such class's slots, taken in `dev_order`, to its replicas sorted by group (then replica rank, so
    copies of one expert land on different devices). Device loads and memory do not change; groups
    gather on consecutive devices."""
    kind = w if ib is None else list(zip(w, ib))
    classes: dict = {}
    for d in dev_order:
        for k, i in enumerate(bins[d]):
            slots, members = classes.setdefault(kind[i], ([], []))
            slots.append((d, k))
            members.append(i)
    for slots, members in classes.values():
        if len(members) > 1:
            members.sort(key=lambda i: (grp[i], rank[i], i))
            for (d, k), i in zip(slots, members):
                bins[d][k] = i


def _improve_locality(bins: list[list[int]], w: list[float], lightest_first: list[int], grp: list[int],
                      n_groups: int, remote: list[list[float]], use_traffic: bool, cap: float,
                      ib: list[int] | None, mcap: list[float] | None, max_passes: int = 2) -> None:
    """Swaps of replicas of different groups that keep every device at or under `cap` (the best max
    load) and improve (traffic, devices per group, sum of squared per-device group counts)
    lexicographically. A swap that changes loads must stay cap * 1e-9 below the cap, so rounding
    can never lift the maximum; swapping equal loads is always allowed. Without traffic, only
    replicas whose group holds at most half of their device look for a move. Partners of a replica are
    the other groups' replicas whose load lies in the window the caps allow (bisection in each
    group's replicas sorted by load) when that window is narrow, else the other groups' replicas on
    the devices where its group is at least as present."""
    n = len(bins)
    load_of = w.__getitem__
    loads = [math.fsum(map(load_of, b)) for b in bins]
    lim = cap - 1e-9 * cap
    dev = [0] * len(w)
    on = [[[] for _ in range(n_groups)] for _ in range(n)]  # [device][group] -> its replicas there
    for d, b in enumerate(bins):
        for i in b:
            dev[i] = d
            on[d][grp[i]].append(i)
    cnt = [[len(on[d][g]) for d in range(n)] for g in range(n_groups)]
    mixed = {d for d, row in enumerate(zip(*cnt)) if n_groups - row.count(0) > 1}  # holding 2+ groups
    mem = [sum(ib[i] for i in b) for b in bins] if ib is not None else None
    order = lightest_first
    # each group's replicas by load: the loads never change, only devices do
    by_load: list[list[int]] = [[] for _ in range(n_groups)]
    for i in order:
        by_load[grp[i]].append(i)
    keys = [list(map(load_of, items)) for items in by_load]
    others = [[h for h in range(n_groups) if h != g] for g in range(n_groups)]
    s = len(bins[0])  # slots per device
    narrow = n * s // 4
    most = s if use_traffic else s // 2  # a group with more replicas on a device waits for partners
    bisect_left, bisect_right = bisect.bisect_left, bisect.bisect_right
    for _ in range(max_passes):
        changed = False
        slack = lim - min(loads)
        for a in order:
            g, d = grp[a], dev[a]
            cg = cnt[g]
            cgd = cg[d]
            if cgd > most:
                continue  # the group holds most of this device: its partners come to it instead
            rg = remote[g]
            wa, ld = w[a], loads[d]
            lo, hi = wa - slack, wa + lim - ld  # w[b] <= hi keeps device d under the cap
            cand = []
            for h in others[g]:
                kh = keys[h]
                j0 = bisect_left(kh, lo)
                j1 = bisect_right(kh, hi, j0)
                cand += by_load[h][j0:j1]
                if hi < wa:  # equal loads may always swap
                    q0 = bisect_left(kh, wa, j1)
                    cand += by_load[h][q0:bisect_right(kh, wa, q0)]
            if len(cand) > narrow:  # a wide window: the devices where this group is at least as present
                devices = range(n) if use_traffic else mixed
                cand = [b for e in devices if e != d and (cg[e] >= cgd or (use_traffic and rg[e] < rg[d]))
                        for h in others[g] for b in on[e][h]]
            best, move = (0.0, 0, 0), None
            for b in cand:
                e = dev[b]
                if e == d or (cg[e] < cgd and not (use_traffic and rg[e] < rg[d])):
                    continue
                x = wa - w[b]
                if x != 0.0 and (ld - x > lim or loads[e] + x > lim):
                    continue
                if mem is not None and (mem[d] - ib[a] + ib[b] > mcap[d] or mem[e] + ib[a] - ib[b] > mcap[e]):
                    continue
                h = grp[b]
                ch = cnt[h]
                spread = (cgd == 1) - (cg[e] == 0) + (ch[e] == 1) - (ch[d] == 0)
                sq = 2 * (cg[e] - cgd) + 2 * (ch[d] - ch[e]) + 4
                traffic = 0.0
                if use_traffic:
                    traffic = wa * (rg[d] - rg[e]) + w[b] * (remote[h][e] - remote[h][d])
                    traffic = traffic if abs(traffic) > 1e-12 * (wa + w[b]) else 0.0
                gain = (traffic, spread, sq)
                if gain > best:
                    best, move = gain, (b, e, x)
            if move is None:
                continue
            b, e, x = move
            h = grp[b]
            bins[d][bins[d].index(a)] = b
            bins[e][bins[e].index(b)] = a
            on[d][g].remove(a)
            on[e][h].remove(b)
            on[e][g].append(a)
            on[d][h].append(b)
            dev[a], dev[b] = e, d
            cnt[g][d] -= 1
            cnt[g][e] += 1
            cnt[h][e] -= 1
            cnt[h][d] += 1
            loads[d] -= x
            loads[e] += x
            if mem is not None:
                mem[d] += ib[b] - ib[a]
                mem[e] += ib[a] - ib[b]
            for dd in (d, e):  # each holds g or h now: mixed unless one of them fills it
                if len(bins[dd]) in (cnt[g][dd], cnt[h][dd]):
                    mixed.discard(dd)
                else:
                    mixed.add(dd)
            slack = lim - min(loads)
            changed = True
        if not changed:
            return


def _phy2log(bins: list[list[int]], item_log: list[int], sort: bool) -> list[int]:
    out = []
    log_of = item_log.__getitem__
    for b in bins:
        out += sorted(map(log_of, b)) if sort else map(log_of, b)
    return out


def _fits(plan: LayerPlan, mcap: list[float] | None) -> bool:
    return mcap is None or all(m <= c for m, c in zip(plan.memory_bytes, mcap))


# ---- the three methods ---------------------------------------------------------------------------
def round_robin(problem: PlacementProblem) -> Plan:
    """Load-oblivious baseline: replica t is logical expert t mod E and sits on device t mod N."""
    _validate(problem)
    start = time.perf_counter()
    n, r = problem.num_devices, problem.redundant
    layers = []
    for lp in problem.layers:
        e = lp.num_experts
        bins: list[list[int]] = [[] for _ in range(n)]
        for t in range(e + r):
            bins[t % n].append(t % e)
        layers.append(_evaluate(lp, n, [x for b in bins for x in b], problem.activation_bytes))
    return Plan(n, r, "round-robin", layers, problem.memory_limit, time.perf_counter() - start)


def eplb_baseline(problem: PlacementProblem) -> Plan:
    """DeepSeek EPLB, global policy (no node hierarchy): greedy replication, then balanced packing.
    Memory is only checked against the lower bound (EPLB itself ignores memory)."""
    _validate(problem)
    start = time.perf_counter()
    n, r = problem.num_devices, problem.redundant
    layers = []
    for lp in problem.layers:
        cnt, item_log, _ = _replicate(lp.load, r)
        w = [lp.load[x] / cnt[x] for x in item_log]
        bins = _lpt(w, n, len(w) // n)
        layers.append(_evaluate(lp, n, _phy2log(bins, item_log, sort=False), problem.activation_bytes))
    return Plan(n, r, "eplb", layers, problem.memory_limit, time.perf_counter() - start)


def _max_load(bins: list[list[int]], w: list[float]) -> float:
    load_of = w.__getitem__
    return max([math.fsum(map(load_of, b)) for b in bins])


def _locality_key(bins, w, grp, remote, use_traffic) -> tuple[float, int]:
    traffic = 0.0
    if use_traffic:
        traffic = math.fsum(w[i] * remote[grp[i]][d] for d, b in enumerate(bins) for i in b)
    group_of = grp.__getitem__
    return traffic, sum([len(set(map(group_of, b))) for b in bins])


def _bins_fit(bins, ib, mcap) -> bool:
    return ib is None or all(sum(ib[i] for i in b) <= c for b, c in zip(bins, mcap))


class _Items:
    """The replicas of one replication of a layer: logical expert, replicas of it and load of each;
    group, replica rank and bytes when asked for."""

    def __init__(self, lp: LayerProblem, cnt: list[int], log: list[int], gof: list[int]):
        self.log, self.cnt = log, cnt
        per_replica = [load / c for load, c in zip(lp.load, cnt)]
        self.w = [per_replica[x] for x in log]
        self._lp, self._gof = lp, gof

    @functools.cached_property
    def heaviest_first(self) -> list[int]:
        return _heaviest_first(self.w)

    @functools.cached_property
    def lightest_first(self) -> list[int]:  # equal loads in index order
        return sorted(range(len(self.w)), key=self.w.__getitem__)

    @functools.cached_property
    def grp(self) -> list[int]:
        return [self._gof[x] for x in self.log]

    @functools.cached_property
    def rank(self) -> list[int]:
        # the first len(cnt) replicas are the experts themselves (rank 0), then the extra copies
        seen = [1] * len(self.cnt)
        rank = [0] * len(self.cnt)
        for x in self.log[len(self.cnt):]:
            rank.append(seen[x])
            seen[x] += 1
        return rank

    @functools.cached_property
    def ib(self) -> list[int]:
        return [self._lp.expert_bytes[x] for x in self.log]


def _place_layer(lp: LayerProblem, n: int, r: int, act_bytes: int, mcap: list[float] | None,
                 planned: tuple[_Items, list[list[int]]] | None = None) -> LayerPlan:
    layout = _layout(tuple(lp.groups), n)
    gof, remote = layout.group_of, layout.remote
    n_groups = len(lp.groups)
    use_traffic = lp.d_model > 0 and any(g.home_devices for g in lp.groups)
    local = n_groups > 1 or use_traffic
    hetero = mcap is not None and len(set(lp.expert_bytes)) > 1
    mc = mcap if hetero else None
    iters = 4 * n + 16

    # replication variants: EPLB's rule first (its LPT packing is EPLB's plan), then Webster's.
    # With groups, ties in load per replica go to the groups in turn (in proportion to their sizes),
    # so the half-load replicas of a uniform profile do not all belong to the first group; kept only
    # when the replica loads are the same multiset as EPLB's (then balance is unaffected). Without a
    # tie on the way, EPLB's own tie-break picks exactly the same.
    tb = layout.tiebreak if local and r else None
    cnt, log, tied = _replicate(lp.load, r, tb)
    first = eplb = _Items(lp, cnt, log, gof)
    if tb is not None and tied:
        cnt, log, _ = _replicate(lp.load, r)
        eplb = _Items(lp, cnt, log, gof)
        if first.cnt != eplb.cnt and sorted(first.w) != sorted(eplb.w):
            first = eplb
    variants = [first]
    if r:
        cnt, log, _ = _replicate(lp.load, r, tb, offset=0.5)
        web = _Items(lp, cnt, log, gof)
        if web.cnt != first.cnt:
            variants.append(web)
    s = len(eplb.w) // n
    # variants[0] has EPLB's replica loads, so its LPT packing has EPLB's device loads
    eplb_lpt = _lpt(variants[0].w, n, s, variants[0].heaviest_first)
    eplb_max = _max_load(eplb_lpt, variants[0].w)

    scored = []
    if not hetero:
        # the variant whose LPT packing is best (ties: EPLB's) is improved by swaps (and packed a
        # second time by Karmarkar-Karp + swaps below)
        for it in variants:
            if it is variants[0]:
                bins, m = [list(b) for b in eplb_lpt], eplb_max
            else:
                bins = _lpt(it.w, n, s, it.heaviest_first)
                m = _max_load(bins, it.w)
            scored.append((m, len(scored), it, bins))
        _, _, it, bins = min(scored, key=lambda t: t[:2])
        _refine_balance(bins, it.w, it.lightest_first, None, None, iters)
        scored = [(_max_load(bins, it.w), 0, it, bins)]
    else:
        # experts of different sizes under a memory limit: also a replication that only copies the
        # smallest experts, and packings that start memory-balanced; swaps keep every device within
        # its memory budget
        starts = [(it, _lpt(it.w, n, s, it.heaviest_first)) for it in variants]
        starts += [(it, _memory_first(it.w, it.ib, n, s, mc)) for it in variants]
        if planned is not None:
            starts.append((planned[0], [list(b) for b in planned[1]]))
        for it, bins in starts:
            if bins is not None and _bins_fit(bins, it.ib, mc):
                _refine_balance(bins, it.w, it.lightest_first, it.ib, mc, iters)
                scored.append((_max_load(bins, it.w), len(scored), it, bins))
    if not scored:
        raise PlacementError(f"MoE layer {lp.name or lp.layer}: found no placement within the memory limit "
                             f"(per-device budget left for this layer: {_human_bytes(min(mcap))}); use more "
                             "devices, fewer redundant replicas or a larger limit")
    best_max, _, it, bins = min(scored, key=lambda t: t[:2])
    pool = [bins]
    lower = _load_lower_bound(it.w, n, s)
    # a second packing only while the first is more than 0.1% above a lower bound (its gains are
    # small: it rarely beats LPT + swaps by more than 0.01%)
    if best_max > lower * (1 + 1e-3):
        kk = _kk(it.w, n, s, it.heaviest_first)
        _refine_balance(kk, it.w, it.lightest_first, it.ib if hetero else None, mc, iters)
        if not hetero or _bins_fit(kk, it.ib, mc):
            m = _max_load(kk, it.w)
            if m < best_max:
                best_max, pool = m, [kk]
            elif m == best_max:
                pool.append(kk)
    w = it.w
    ib = it.ib if hetero else None

    if local:
        grp = it.grp
        replicas = collections.Counter(grp)
        bound = sum(-(-replicas[g] // s) for g in range(n_groups))
        found = []
        # a device of the balanced packing holding a replica heavier than half the cap keeps its
        # replicas: they fit only with a few chosen partners, which group by group would go elsewhere
        heavy = set(itertools.takewhile(lambda i: 2 * w[i] > best_max, it.heaviest_first))
        start = [b if not heavy.isdisjoint(b) else [] for b in pool[0]]
        # with most devices kept there is little left to regroup
        kept = sum(1 for b in start if b)
        grouped = (_group_pack(w, grp, n_groups, n, s, best_max, remote, ib, mc, start, it.heaviest_first)
                   if 2 * kept <= n else None)
        for k, bins in enumerate(([grouped] if grouped is not None else []) + pool):
            bins = [list(b) for b in bins]
            _relabel(bins, w, grp, it.rank, layout.dev_order, ib)  # keeps every device's loads and bytes
            moved = k == 0 and grouped is not None
            key = _locality_key(bins, w, grp, remote, use_traffic)
            if k == 0 and (use_traffic or key[1] > bound):
                _improve_locality(bins, w, it.lightest_first, grp, n_groups, remote, use_traffic, best_max, ib, mc)
                moved = True
                key = _locality_key(bins, w, grp, remote, use_traffic)
            if not moved or (_max_load(bins, w) <= best_max and _bins_fit(bins, ib, mc)):
                found.append((key, bins))
                if not use_traffic and key[1] <= bound:
                    break  # every group on the fewest devices its replica count allows
        found += [(_locality_key(b, w, grp, remote, use_traffic), b) for b in pool]
        best = min(found, key=lambda t: t[0])[1]
    else:
        best = pool[0]
    if best_max > eplb_max:  # never worse than EPLB, even by a rounding error
        plan = _evaluate(lp, n, _phy2log(_lpt(eplb.w, n, s), eplb.log, sort=False), act_bytes)
        if _fits(plan, mcap):
            return plan
    return _evaluate(lp, n, _phy2log(best, it.log, sort=True), act_bytes)


def _memory_first(w, ib, n, s, mcap) -> list[list[int]] | None:
    """Largest replicas (bytes, then load) first onto the device with the most memory headroom."""
    bins: list[list[int]] = [[] for _ in range(n)]
    mem = [0] * n
    loads = [0.0] * n
    for i in sorted(range(len(w)), key=lambda i: (-ib[i], -w[i])):
        free = [d for d in range(n) if len(bins[d]) < s and mem[d] + ib[i] <= mcap[d]]
        if not free:
            return None
        d = max(free, key=lambda d: (mcap[d] - mem[d], -loads[d]))
        bins[d].append(i)
        mem[d] += ib[i]
        loads[d] += w[i]
    return bins


def _lean_items(lp: LayerProblem, r: int, gof: list[int]) -> _Items:
    """Replication that only copies the smallest experts (the least memory), by EPLB's rule."""
    small = min(lp.expert_bytes)
    lean_load = [x if b == small else -1.0 for x, b in zip(lp.load, lp.expert_bytes)]
    cnt, log, _ = _replicate(lean_load, r)
    return _Items(lp, cnt, log, gof)


def _memory_plan(problem: PlacementProblem) -> list[tuple[_Items, list[list[int]]]]:
    """A memory-only plan for experts of different sizes: the lean replication of every layer; how
    many replicas of each size every device holds per layer, decided largest first (onto the device
    with the least memory so far), then improved by exchanging a larger for a smaller replica of the
    same layer between the fullest device and another, until the fullest cannot shrink. Its
    per-device bytes become each layer's budget for the later layers, so the real placement of every
    layer always has at least this packing to fall back on. Raises when it exceeds the limit."""
    n, r, limit = problem.num_devices, problem.redundant, problem.memory_limit
    lean = [_lean_items(lp, r, _layout(tuple(lp.groups), n).group_of) for lp in problem.layers]
    sizes = [sorted(set(it.ib), reverse=True) for it in lean]
    cnt = [[[0] * len(sz) for _ in range(n)] for sz in sizes]  # [layer][device][size class]
    used = [0] * n
    order = sorted((-b, li) for li, it in enumerate(lean) for b in it.ib)
    free = [[len(it.w) // n] * n for it in lean]
    for nb, li in order:
        d = min((d for d in range(n) if free[li][d]), key=lambda d: (used[d], d))
        cnt[li][d][sizes[li].index(-nb)] += 1
        free[li][d] -= 1
        used[d] -= nb
    while True:  # exchanges that lower the fullest device
        d = max(range(n), key=used.__getitem__)
        best, move = used[d], None
        for li, sz in enumerate(sizes):
            for ca in range(len(sz)):
                if not cnt[li][d][ca]:
                    continue
                for cb in range(ca + 1, len(sz)):
                    x = sz[ca] - sz[cb]
                    for e in range(n):
                        if e != d and cnt[li][e][cb] and max(used[d] - x, used[e] + x) < best:
                            best, move = max(used[d] - x, used[e] + x), (li, ca, cb, e, x)
        if move is None:
            break
        li, ca, cb, e, x = move
        cnt[li][d][ca] -= 1
        cnt[li][d][cb] += 1
        cnt[li][e][cb] -= 1
        cnt[li][e][ca] += 1
        used[d] -= x
        used[e] += x
    if max(used) > limit:
        raise PlacementError(
            f"found no placement within the memory limit {_human_bytes(limit)} per device: the best packing "
            f"found needs {_human_bytes(max(used))} (the lower bound is "
            f"{_human_bytes(_memory_lower_bound(problem))}); use more devices, fewer redundant replicas or a "
            "larger limit")
    out = []
    for li, it in enumerate(lean):  # the replicas of each size, heaviest first, onto the lightest device
        bins: list[list[int]] = [[] for _ in range(n)]
        loads = [0.0] * n
        for c, size in enumerate(sizes[li]):
            left = [cnt[li][d][c] for d in range(n)]
            for j in sorted((j for j in range(len(it.w)) if it.ib[j] == size), key=lambda j: -it.w[j]):
                d = min((d for d in range(n) if left[d]), key=lambda d: (loads[d], d))
                bins[d].append(j)
                loads[d] += it.w[j]
                left[d] -= 1
        out.append((it, bins))
    return out


def place(problem: PlacementProblem) -> Plan:
    """Balanced, memory-feasible, locality-aware placement (see the module docstring)."""
    _validate(problem)
    start = time.perf_counter()
    n, r = problem.num_devices, problem.redundant
    limit = problem.memory_limit
    mixed = limit is not None and any(len(set(lp.expert_bytes)) > 1 for lp in problem.layers)
    plan_ahead = _memory_plan(problem) if mixed else None
    # bytes per device the later layers' memory plan needs: kept free while placing a layer
    future = [[0] * n for _ in range(len(problem.layers) + 1)]
    if plan_ahead is not None:
        for i in range(len(problem.layers) - 1, -1, -1):
            it, bins = plan_ahead[i]
            future[i] = [f + sum(it.ib[j] for j in b) for f, b in zip(future[i + 1], bins)]
    used = [0] * n
    layers = []
    for i, lp in enumerate(problem.layers):
        mcap = [limit - used[d] - future[i + 1][d] for d in range(n)] if limit is not None else None
        plan = _place_layer(lp, n, r, problem.activation_bytes, mcap, plan_ahead[i] if plan_ahead else None)
        used = [u + m for u, m in zip(used, plan.memory_bytes)]
        layers.append(plan)
    return Plan(n, r, "place", layers, limit, time.perf_counter() - start)


# ---- from the IR ---------------------------------------------------------------------------------
_NAME = re.compile(r"^(?P<moe>.*?\.moe(?:_\d+)?)(?:\.(?P<group>[^.]+))?"
                   r"\.(?P<what>router|route|select|experts(?:\.(?:up|gate|down)_proj)?)$")


def _own_params(e) -> int:
    """Parameters that move with one expert: its FFN, or a LoRA expert's adapters (their frozen
    base FFN is shared by the pool and needed on every device that holds one of them)."""
    return e.params if e.lora_rank is None else e.adapter_params


def _moe_layers(graph) -> list[dict]:
    """MoE layers in program order: {name, layer, dim, groups: [{name, experts, k, params, modalities}]}.
    Works on unlowered (`moe` ops), lowered (router_gate / route / expert_gemm) and fused
    (router / fused_experts) graphs."""
    inp = graph.find("input")
    modalities = graph.op(inp[0]).modalities if inp else ()
    layers: dict[str, dict] = {}
    for node in graph.nodes():
        op = graph.op(node)
        if op.kind == "moe":
            entry = layers.setdefault(op.name, {"name": op.name, "layer": op.layer, "dim": op.dim,
                                                "groups": {}})
            for g in op.groups:
                entry["groups"][g.name] = {"name": g.name, "experts": g.num_experts, "routed": g.routed_experts,
                                           "k": g.router.k,
                                           "params": _own_params(g.expert),
                                           "modalities": tuple(modalities[i] for i in g.modalities)}
            continue
        if op.kind not in ("router_gate", "router", "route", "select_tokens", "expert_gemm", "fused_experts"):
            continue
        m = _NAME.match(op.name)
        if m is None:
            continue
        entry = layers.setdefault(m["moe"], {"name": m["moe"], "layer": op.layer, "dim": None, "groups": {}})
        gname = m["group"] or "all"
        g = entry["groups"].setdefault(gname, {"name": gname, "experts": None, "routed": None, "k": 1,
                                               "params": 0, "modalities": ()})
        if op.kind in ("router_gate", "router"):
            g["routed"], entry["dim"] = op.num_experts, op.dim  # zero-computation experts included
            if op.kind == "router":
                g["k"] = op.router.k
        elif op.kind == "route":
            g["k"] = op.router.k
        elif op.kind == "select_tokens":
            g["modalities"] = tuple(op.modality_names)
        elif op.kind == "expert_gemm":
            if op.lora_rank is None:
                g["params"] += op.in_dim * op.out_dim + (op.out_dim if op.bias else 0)
            elif op.adapted:
                g["params"] += op.lora_rank * (op.in_dim + op.out_dim)
            g["experts"] = op.num_experts
        else:  # fused_experts
            g["params"] += _own_params(op.expert)
            g["experts"] = op.num_experts
    out = []
    for entry in layers.values():
        groups = [g for g in entry["groups"].values() if g["experts"]]
        if not groups:
            continue
        for g in groups:
            g["routed"] = g["routed"] or g["experts"]
            if not g["modalities"]:
                g["modalities"] = tuple(modalities)
        out.append({**entry, "groups": groups})
    return out


def check_plan(plan, graph) -> None:
    """Raise PlacementError unless `plan` (a `moec place` plan, as loaded from its JSON) places
    exactly this model's MoE layers: each layer by name, every expert at least once, the same
    number of slots on every device."""
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list):
        raise PlacementError("not a placement plan: expected a JSON object with `num_devices` and `layers` "
                             "(write one with `moec place FILE -n DEVICES -o PLAN.json`)")
    n = plan.get("num_devices")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PlacementError(f"the plan's `num_devices` must be a positive integer, got {n!r}")
    entries = {}
    for entry in plan["layers"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("phy2log"), list)
                and all(isinstance(e, int) and not isinstance(e, bool) for e in entry["phy2log"])):
            raise PlacementError("every layer of the plan needs a `name` and a `phy2log` list of expert ids")
        entries[entry["name"]] = entry["phy2log"]
    layers = _moe_layers(graph)
    names = [layer["name"] for layer in layers]
    if sorted(entries) != sorted(names):
        raise PlacementError(f"the plan places MoE layers {', '.join(sorted(entries)) or 'none'} but the model has "
                             f"{', '.join(names) or 'none'}: it was made for another model "
                             "(write one with `moec place FILE -n DEVICES -o PLAN.json`)")
    for layer in layers:
        phy2log, experts = entries[layer["name"]], sum(g["experts"] for g in layer["groups"])
        if sorted(set(phy2log)) != list(range(experts)):
            ids = sorted(set(phy2log))
            placed = f"{len(ids)} experts (ids {ids[0]}..{ids[-1]})" if ids else "no experts"
            raise PlacementError(f"the plan's layer {layer['name']} places {placed} but the layer has {experts} "
                                 f"(ids 0..{experts - 1}): the plan was made for another model")
        if len(phy2log) % n:
            raise PlacementError(f"the plan's layer {layer['name']} has {len(phy2log)} expert slots, which do not "
                                 f"divide over its {n} devices")


def load_profile(profile) -> list[list[float]]:
    """Tokens per expert per MoE layer from a `moec train --profile` file, its dict or the lists."""
    source = "routing profile"
    if isinstance(profile, str):
        source = f"routing profile {profile}"
        try:
            with open(profile) as fh:
                profile = json.load(fh)
        except OSError as exc:
            raise PlacementError(f"cannot read {source}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise PlacementError(f"{source} is not valid JSON: {exc}") from None
    if isinstance(profile, dict):
        if "tokens_per_expert" not in profile:
            raise PlacementError(f"{source} has no `tokens_per_expert` (expected the JSON written by "
                                 "`moec train --profile`)")
        profile = profile["tokens_per_expert"]
    ok = isinstance(profile, list) and all(
        isinstance(row, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        for row in profile)
    if not ok:
        raise PlacementError(f"{source}: `tokens_per_expert` must be a list (one per MoE layer) of lists "
                             "of numbers (tokens per expert)")
    return [[float(v) for v in row] for row in profile]


def problem_from_graph(graph, devices: int, memory_bytes: int | str | None = None, redundant: int = 0,
                       profile=None, bytes_per_param: int = 2, d_model: int | None = None,
                       modality_devices: dict[str, list[int]] | str | None = None,
                       activation_bytes: int = 2) -> PlacementProblem:
    """The placement problem of a compiled model's MoE layers.

    `profile`: a routing-profile path, its dict, or tokens-per-expert lists (one per MoE layer, groups
    concatenated in declaration order); None means uniform load (1 token per expert per step: relative
    units). `modality_devices` maps a modality to the devices its tokens live on (traffic model)."""
    moes = _moe_layers(graph)
    if isinstance(modality_devices, str):
        modality_devices = parse_modality_devices(modality_devices)
    if modality_devices:
        known = sorted({m for moe in moes for g in moe["groups"] for m in g["modalities"]})
        for name, devs in modality_devices.items():
            if name not in known:
                raise PlacementError(f"unknown modality `{name}` in modality devices (the MoE layers route: "
                                     f"{', '.join(known) or 'none'})")
            if any(not 0 <= d < devices for d in devs):
                raise PlacementError(f"modality `{name}` is homed on devices {devs}, but there are only "
                                     f"{devices} devices")
    loads = load_profile(profile) if profile is not None else None
    # a profile has one row per layer with routed experts; attention experts' counts lead their layer's row
    attention = {graph.op(n).layer: graph.op(n).num_experts for n in graph.find("attention_experts")}
    if loads is not None and attention:
        counted = sorted({m["layer"] for m in moes} | set(attention))
        if len(loads) == len(counted):
            rows = dict(zip(counted, loads))
            loads = [rows[m["layer"]][attention.get(m["layer"], 0):] for m in moes]
    if loads is not None and len(loads) != len(moes):
        where = ", ".join(f"{m['name']}" for m in moes) or "none"
        plural = "s" if len(loads) != 1 else ""
        raise PlacementError(f"routing profile has {len(loads)} MoE layer{plural} but "
                             f"the model has {len(moes)} ({where}); was it recorded for another model?")
    layers = []
    for i, m in enumerate(moes):
        groups, start, sizes, columns = [], 0, [], []
        for g in m["groups"]:
            # profile columns of this group's computed experts (its zero-computation ones follow them)
            first = sum(h["routed"] for h in m["groups"][:len(groups)])
            columns += range(first, first + g["experts"])
            homes = None
            if modality_devices:
                devs = sorted({d for mod in g["modalities"] for d in modality_devices.get(mod, ())})
                homes = tuple(devs) if devs else None
            groups.append(ExpertGroup(g["name"], start, g["experts"], g["k"], g["modalities"], homes))
            start += g["experts"]
            sizes += [g["params"] * bytes_per_param] * g["experts"]
        if loads is not None:
            routed = sum(g["routed"] for g in m["groups"])
            if len(loads[i]) != routed:
                raise PlacementError(f"routing profile layer {i} has {len(loads[i])} experts but {m['name']} has "
                                     f"{routed}")
            load = [loads[i][c] for c in columns]
        else:
            load = [1.0] * start
        layers.append(LayerProblem(m["layer"] if m["layer"] is not None else i, list(load), sizes, groups,
                                   d_model if d_model is not None else (m["dim"] or 0), m["name"]))
    mem = parse_bytes(memory_bytes) if memory_bytes is not None else None
    return PlacementProblem(layers, devices, redundant, mem, activation_bytes)


# ---- the pass ------------------------------------------------------------------------------------
METHODS = {"place": place, "eplb": eplb_baseline, "round-robin": round_robin}


@dataclass
class PlaceExperts(Pass):
    """Options: devices (None: record nothing), memory ("80GB" or bytes, per device), redundant
    replicas per MoE layer, profile (routing-profile JSON path), method (place / eplb / round-robin)."""

    name: ClassVar[str] = "place-experts"
    description: ClassVar[str] = "assign experts and redundant replicas to expert-parallel devices"

    devices: int | None = None
    memory: str | int | None = None
    redundant: int = 0
    profile: str | None = None
    bytes_per_param: int = 2
    method: str = "place"
    modality_devices: dict[str, list[int]] | str | None = None  # "image=0-3,text=4-7" or a dict

    def run(self, graph, ctx: PassContext) -> bool:
        if self.devices is None:
            return False
        if self.method not in METHODS:
            raise PlacementError(f"unknown placement method `{self.method}` "
                                 f"(choose from {', '.join(METHODS)})")
        problem = problem_from_graph(graph, self.devices, self.memory, self.redundant, self.profile,
                                     self.bytes_per_param, modality_devices=self.modality_devices)
        ctx.results["placement"] = METHODS[self.method](problem).to_json()
        return False  # placement never changes the graph or its numerics


# ---- report ----------------------------------------------------------------------------------------
def format_plan(plan: dict) -> str:
    """A readable summary of `Plan.to_json()` (for `moec report --plan plan.json`)."""
    n = plan["num_devices"]
    layers = plan["layers"]
    lines = [(f"expert placement: {plan.get('method', '?')}, {n} devices, {plan['redundant']} redundant "
              f"replicas per MoE layer, {len(layers)} MoE layers")]
    if plan.get("memory_limit"):
        ok = "fits" if plan.get("memory_ok", True) else "DOES NOT FIT"
        lines.append(f"memory limit {_human_bytes(plan['memory_limit'])} per device: {ok}")
    lines.append("")
    head = (f"{'layer':>5}  {'name':<22} {'slots/dev':>9} {'max/mean':>9} {'max load':>11} {'mean load':>11} "
            f"{'all-to-all/step':>16}  devices per group")
    lines += [head, "-" * len(head)]
    for lp in layers:
        loads = lp["device_load"]
        mean = sum(loads) / len(loads)
        groups = ", ".join(f"{k} {v}" for k, v in lp.get("group_devices", {}).items())
        lines.append(f"{lp['layer']:>5}  {lp.get('name', '')[:22]:<22} {len(lp['phy2log']) // n:>9} "
                     f"{lp['max_mean_load']:>9.4f} {max(loads):>11.2f} {mean:>11.2f} "
                     f"{_human_bytes(lp['all_to_all_bytes']):>16}  {groups}")
    lines.append("-" * len(head))
    lines.append(f"worst layer max/mean load {plan['max_mean_load']:.4f}; all-to-all "
                 f"{_human_bytes(plan['all_to_all_bytes_per_step'])} per step (dispatch + combine)")
    lines.append("")
    head = f"{'device':>6} {'load (sum)':>12} {'peak load/mean':>15} {'memory':>12} {'all-to-all/step':>16}"
    lines += [head, "-" * len(head)]
    for d in range(n):
        total = sum(lp["device_load"][d] for lp in layers)
        peak = max((lp["device_load"][d] / (sum(lp["device_load"]) / n) if sum(lp["device_load"]) else 1.0
                    for lp in layers), default=1.0)
        a2a = sum(lp.get("device_all_to_all_bytes", [0.0] * n)[d] for lp in layers)
        lines.append(f"{d:>6} {total:>12.2f} {peak:>15.4f} {_human_bytes(plan['memory_bytes'][d]):>12} "
                     f"{_human_bytes(a2a):>16}")
    lines.append("")
    lines.append("load = expected tokens per step on the device's expert replicas (a replica carries its "
                 "expert's load / replicas); all-to-all = tokens sent to experts off their home device, "
                 "d_model x activation bytes x 2 (dispatch + combine), tokens homed uniformly unless "
                 "modality devices are given.")
    return "\n".join(lines)
