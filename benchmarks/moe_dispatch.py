"""Benchmark MoE expert dispatch methods of the moec PyTorch runtime (fwd+bwd).

Usage: ``python benchmarks/moe_dispatch.py [--quick] [--threads N] [--reps N] [--dtype fp32|bf16]``

For each shape, times one forward+backward pass (median over reps, after warmup) of

* every ``moe_experts`` method (grouped_mm / split / padded_bmm / auto),
* "naive loop": HF-Mixtral-style per-expert Python loop, one ``nn.Linear`` per
  projection per expert, ``torch.where`` masks and ``index_add_``,
* "dense floor": one dense matmul chain doing the same FLOPs as the routed
  experts (T*k rows through one expert's FFN, in the benchmark dtype: fp32 by
  default), i.e. no routing, gather, scatter or per-expert overhead at all.

and prints time (ms), ratio vs the naive loop and ratio vs the dense floor.
Routing (router matmul + softmax top-k) is shared and excluded from the timing;
all variants consume the same (expert_ids, weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from ab_timing import load_runtime
from torch import nn

rt = load_runtime()

FULL_SHAPES = [
    # (E, k, T, d, f, glu)
    (8, 2, 1024, 256, 512, True),
    (64, 8, 2048, 256, 256, True),
    (16, 4, 1024, 256, 256, False),
    (128, 4, 2048, 256, 256, True),
]
QUICK_SHAPES = [
    (8, 2, 256, 64, 128, True),
    (32, 4, 256, 64, 64, True),
]


class NaiveMoE(nn.Module):
    """HF-Mixtral style: per-expert nn.Linear modules, where() masks, Python loop over experts."""

    def __init__(self, up, down, gate):
        super().__init__()
        E, d, f = up.shape
        self.glu = gate is not None
        self.up = nn.ModuleList(nn.Linear(d, f, bias=False) for _ in range(E))
        self.down = nn.ModuleList(nn.Linear(f, d, bias=False) for _ in range(E))
        self.gate = nn.ModuleList(nn.Linear(d, f, bias=False) for _ in range(E)) if self.glu else None
        with torch.no_grad():
            for e in range(E):
                self.up[e].weight.copy_(up[e].T)
                self.down[e].weight.copy_(down[e].T)
                if self.glu:
                    self.gate[e].weight.copy_(gate[e].T)

    def forward(self, x, expert_ids, weights):
        out = torch.zeros_like(x)
        E = len(self.up)
        mask = F.one_hot(expert_ids, num_classes=E).permute(2, 1, 0)  # [E, k, T]
        for e in range(E):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = F.silu(self.gate[e](xe)) * self.up[e](xe) if self.glu else F.silu(self.up[e](xe))
            ye = self.down[e](h) * weights[tok, slot, None]
            out.index_add_(0, tok, ye.to(x.dtype))
        return out


def time_fns(fns: dict, warmup: int, reps: int) -> dict:
    """Median wall time (ms) per callable; reps are interleaved round-robin to spread machine noise."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_shape(E, k, T, d, f, glu, dtype, warmup, reps):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=gen).to(dtype).requires_grad_()
    scale_in, scale_h = d**-0.5, f**-0.5
    up = (torch.randn(E, d, f, generator=gen) * scale_in).to(dtype).requires_grad_()
    down = (torch.randn(E, f, d, generator=gen) * scale_h).to(dtype).requires_grad_()
    gate = (torch.randn(E, d, f, generator=gen) * scale_in).to(dtype).requires_grad_() if glu else None
    logits = torch.randn(T, E, generator=gen)
    w, ids, _ = rt.route_top_k(logits, k, renormalize=True)
    w = w.requires_grad_()
    gy = torch.randn(T, d, generator=gen).to(dtype)
    params = [x, w, up, down] + ([gate] if glu else [])

    def clear(ps):
        for p in ps:
            p.grad = None

    fns = {}
    for method in ("grouped_mm", "split", "padded_bmm", "auto"):
        host_counts = rt.expert_counts(ids, E).tolist()
        resolved = rt.resolve_method(method, x, up, down, gate, k=k, counts=host_counts)
        label = method if resolved == method else f"{method}->{resolved}"

        def run(method=method):
            clear(params)
            y = rt.moe_experts(x, ids, w, up, down, gate, activation="silu", method=method)
            y.backward(gy)

        fns[label] = run

    naive = NaiveMoE(up.detach(), down.detach(), gate.detach() if glu else None).to(dtype)
    naive_params = [x, w, *naive.parameters()]

    def run_naive():
        clear(naive_params)
        naive(x, ids, w).backward(gy)

    fns["naive loop"] = run_naive

    # Dense floor: same FLOPs as the routed experts (T*k rows through one FFN of the same size).
    xd = torch.randn(T * k, d, generator=gen).to(dtype).requires_grad_()
    up1, down1 = up[0].detach().clone().requires_grad_(), down[0].detach().clone().requires_grad_()
    gate1 = gate[0].detach().clone().requires_grad_() if glu else None
    gd = torch.randn(T * k, d, generator=gen).to(dtype)
    dense_params = [xd, up1, down1] + ([gate1] if glu else [])

    def run_dense():
        clear(dense_params)
        h = F.silu(xd @ gate1) * (xd @ up1) if glu else F.silu(xd @ up1)
        (h @ down1).backward(gd)

    fns["dense floor"] = run_dense

    times = time_fns(fns, warmup, reps)
    t_naive, t_floor = times["naive loop"], times["dense floor"]
    return [(name, ms, ms / t_naive, ms / t_floor) for name, ms in times.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, finishes in seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    reps = args.reps or (7 if args.quick else 15)
    warmup = 2

    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, dtype={args.dtype}, "
        f"fwd+bwd median of {reps} reps (warmup {warmup}); "
        f"grouped_mm available: {rt.grouped_mm_available('cpu', dtype)}; "
        f"load average {os.getloadavg()[0]:.2f} (other busy processes distort timings)"
    )
    for E, k, T, d, f, glu in shapes:
        kind = "SwiGLU" if glu else "SiLU-MLP"
        print(f"\nE={E} k={k} T={T} d={d} f={f} {kind}")
        print(f"  {'method':<22}{'time ms':>10}{'vs naive':>10}{'vs floor':>10}")
        for name, ms, r_naive, r_floor in bench_shape(E, k, T, d, f, glu, dtype, warmup, reps):
            print(f"  {name:<22}{ms:>10.2f}{r_naive:>10.2f}{r_floor:>10.2f}")


if __name__ == "__main__":
    main()
