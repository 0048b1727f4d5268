"""Benchmark expert placement: moec's `place` vs DeepSeek EPLB (global policy) vs round-robin.

Usage: ``python benchmarks/placement.py [--layers 8] [--tokens 65536] [--seed 0] [--quick]``

Problems: E = 256 experts per MoE layer, expert-parallel degree EP in {4, 8, 16, 32}, R redundant
replicas per layer in {0, 8, 16} (E + R must divide by EP: EP=16 R=8, EP=32 R=8 and EP=32 R=16 are
skipped and EP=32 R=32 is run instead). Loads per layer are `--tokens` routed token-expert pairs
drawn from Zipf(1.2) over a random permutation of the experts ("zipf"; hot experts differ per
layer) or exactly uniform ("uniform"); "groups" splits the experts into two modality groups of 128
(text / image, contiguous ids). Columns:

* max/mean: worst layer's max device load / mean device load (1.000 is perfect balance);
* dev/group: devices holding a group's replicas, summed over the groups, averaged over layers
  (fewer = each modality's tokens talk to fewer devices);
* ms: solver time for all layers of the problem.

Then the DeepSeek-V3-sized timing: 256 experts x 64 devices x 61 layers (median of 5 runs, wall
clock and process CPU time; the latter is less disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from moec.passes.place_experts import eplb_baseline, make_problem, place, round_robin

E = 256
METHODS = (("place", place), ("eplb", eplb_baseline), ("round-robin", round_robin))


def zipf_loads(rng: random.Random, tokens: int, a: float = 1.2) -> list[float]:
    weights = [1.0 / (k + 1) ** a for k in range(E)]
    rng.shuffle(weights)
    counts = [0] * E
    for x in rng.choices(range(E), weights=weights, k=tokens):
        counts[x] += 1
    return [float(c) for c in counts]


def loads_for(kind: str, layers: int, tokens: int, rng: random.Random) -> list[list[float]]:
    if kind == "uniform":
        return [[tokens / E] * E for _ in range(layers)]
    return [zipf_loads(rng, tokens) for _ in range(layers)]


def spread(plan) -> float:
    return statistics.fmean(sum(lp.group_devices.values()) for lp in plan.layers)


def timed(fn, problem):
    start = time.perf_counter()
    plan = fn(problem)
    return plan, (time.perf_counter() - start) * 1e3


def timed_cpu(fn, problem):
    start, cpu = time.perf_counter(), time.process_time()
    plan = fn(problem)
    return plan, (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="MoE layers per problem (default 8)")
    ap.add_argument("--tokens", type=int, default=65536, help="routed token-expert pairs per layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer cases (EP 8 and 32 only) and 2 layers")
    args = ap.parse_args()
    layers = 2 if args.quick else args.layers
    eps = (8, 32) if args.quick else (4, 8, 16, 32)

    head = (f"{'EP':>3} {'R':>3} {'loads':<8} {'groups':<6} | {'max/mean place':>14} {'eplb':>7} {'rr':>7} | "
            f"{'dev/group place':>15} {'eplb':>6} | {'ms place':>8} {'eplb':>6} {'rr':>6}")
    print(f"E = {E} experts, {layers} MoE layers per problem, {args.tokens} routed pairs per layer\n")
    print(head)
    print("-" * len(head))
    skipped = []
    worse = 0
    for ep in eps:
        rs = [r for r in (0, 8, 16) if (E + r) % ep == 0]
        skipped += [(ep, r) for r in (0, 8, 16) if (E + r) % ep]
        if len(rs) < 3:
            rs.append(ep if ep not in rs else 2 * ep)
        for r in rs:
            for kind in ("zipf", "uniform"):
                for groups in (None, [128, 128]):
                    rng = random.Random(f"{args.seed}-{ep}-{r}-{kind}")  # stable across processes
                    loads = loads_for(kind, layers, args.tokens, rng)
                    problem = make_problem(loads, ep, r, group_sizes=groups)
                    res = {name: timed(fn, problem) for name, fn in METHODS}
                    mm = {name: plan.max_mean_load for name, (plan, _) in res.items()}
                    worse += mm["place"] > mm["eplb"]
                    g = "2" if groups else "-"
                    sp = (f"{spread(res['place'][0]):>15.1f} {spread(res['eplb'][0]):>6.1f}" if groups
                          else f"{'':>15} {'':>6}")
                    ms = {name: t for name, (_, t) in res.items()}
                    print(f"{ep:>3} {r:>3} {kind:<8} {g:<6} | {mm['place']:>14.4f} {mm['eplb']:>7.4f} "
                          f"{mm['round-robin']:>7.3f} | {sp} | {ms['place']:>8.1f} {ms['eplb']:>6.1f} "
                          f"{ms['round-robin']:>6.1f}")
    print("-" * len(head))
    print(f"skipped (E + R not divisible by EP): {', '.join(f'EP={a} R={b}' for a, b in skipped)}; "
          "R = EP (or 2 EP) run instead where fewer than 3 R values fit")
    print(f"cases where place is worse than eplb: {worse}\n")

    print("DeepSeek-V3 size: 256 experts x 64 devices x 61 MoE layers, Zipf(1.2) loads (median of 5 runs)")
    rng = random.Random(args.seed)
    base = [zipf_loads(rng, args.tokens) for _ in range(61)]
    for r, groups in ((0, None), (64, None), (0, [128, 128]), (64, [128, 128])):
        problem = make_problem(base, 64, r, group_sizes=groups)
        times = {name: [] for name, _ in METHODS}
        cpus = {name: [] for name, _ in METHODS}
        plans = {}
        for _ in range(1 if args.quick else 5):
            for name, fn in METHODS:
                plans[name], ms, cpu = timed_cpu(fn, problem)
                times[name].append(ms)
                cpus[name].append(cpu)
        g = "2 groups" if groups else "1 group"
        med = {name: statistics.median(t) for name, t in times.items()}
        cpu = {name: statistics.median(t) for name, t in cpus.items()}
        mm = {name: plan.max_mean_load for name, plan in plans.items()}
        print(f"  R={r:<3} {g:<8}: place {med['place']:6.1f} ms wall / {cpu['place']:6.1f} ms cpu "
              f"(max/mean {mm['place']:.4f}); eplb {med['eplb']:5.1f} / {cpu['eplb']:5.1f} ms "
              f"({mm['eplb']:.4f}); round-robin {med['round-robin']:5.1f} / {cpu['round-robin']:5.1f} ms "
              f"({mm['round-robin']:.3f})")


if __name__ == "__main__":
    main()
