"""LoRA experts: the low-rank path (``moe_lora_experts``) vs experts with merged weights.

Usage: ``python benchmarks/lora_experts.py [--quick] [--threads 2] [--reps 15]``

Each of E experts is a frozen base FFN plus rank-r adapters, ``W_e = W0 + s A_e B_e`` (MixLoRA,
LLaVA-MoLE). For each shape, on the same routing and parameters, it times (median ms of
interleaved reps after warmup; fwd = no-grad forward, f+b = forward + backward, the adapters and
the input train, the base is frozen):

* **low-rank**: ``moe_lora_experts``, what generated models call: the base as dense GEMMs (up
  and gate once per token), the adapters as rank-r grouped GEMMs;
* **merged**: ``moe_experts`` on ``LoRAExperts.up_proj`` etc., i.e. ``W0 + s A_e B_e`` built
  as [E, in, out] tensors in every call and then the usual expert dispatch.

It also prints the bytes of the merged weights that the low-rank path never allocates. Before
timing, the two outputs and the adapter gradients are checked against each other.
"""

from __future__ import annotations

import sys

import torch
from ab_timing import ab_columns, ab_header, interleaved_medians, load_runtime, parse_args, shape_columns

rt = load_runtime()

FULL_SHAPES = [  # (E, k, T, d, f, rank)
    (8, 2, 64, 512, 1024, 8),
    (8, 2, 1024, 512, 1024, 8),
    (8, 2, 4096, 512, 1024, 8),
    (16, 4, 1024, 512, 1024, 16),
]
QUICK_SHAPES = [(8, 2, 64, 64, 256, 8), (8, 2, 256, 64, 256, 8)]


def paths(experts):
    def low_rank(x, ids, w):
        return rt.moe_lora_experts(x, ids, w, experts)

    def merged(x, ids, w):
        return rt.moe_experts(x, ids, w, experts.up_proj, experts.down_proj, gate_proj=experts.gate_proj)

    return {"low-rank": low_rank, "merged": merged}


def check(fns, experts, x, ids, w) -> None:
    adapters = [p for p in experts.parameters() if p.requires_grad]
    results = []
    for fn in fns.values():
        out = fn(x, ids, w)
        results.append((out.detach(), torch.autograd.grad(out.sum(), adapters)))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def bench(shape, reps: int) -> dict:
    E, k, T, d, f, rank = shape
    torch.manual_seed(0)
    experts = rt.LoRAExperts(E, d, f, glu=True, rank=rank, alpha=2 * rank)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.02)
    x = torch.randn(T, d, requires_grad=True)
    w, ids, _ = rt.route_top_k(torch.randn(T, E), k)
    fns = paths(experts)
    check(fns, experts, x, ids, w)
    adapters = [p for p in experts.parameters() if p.requires_grad]
    current = {}

    def use(name):
        return lambda: current.update(fn=fns[name])

    def fwd():
        with torch.no_grad():
            current["fn"](x, ids, w)

    def fwd_bwd():
        for p in adapters:
            p.grad = None
        x.grad = None
        current["fn"](x, ids, w).sum().backward()

    ms = interleaved_medians({name: use(name) for name in fns}, {"fwd": fwd, "f+b": fwd_bwd}, reps)
    ms["merged MB"] = 3 * E * d * f * 4 / 2**20
    return ms


def main(argv=None) -> int:
    quick, reps = parse_args(argv, __doc__.splitlines()[0], full_reps=15)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    print(f"LoRA experts, SwiGLU, fp32, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"median of {reps} interleaved reps (ms)")
    print(f"{'E':>3} {'k':>2} {'T':>5} {'d':>5} {'f':>5} {'r':>3} | {ab_header('low-rank', 'merged')} | "
          f"{'merged MB':>9}")
    for shape in shapes:
        ms = bench(shape, reps)
        print(shape_columns(shape, (3, 2, 5, 5, 5, 3)) +
              f" | {ab_columns(ms, 'low-rank', 'merged')} | {ms['merged MB']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
