"""Attention experts: the sorted grouped projections vs one GEMM over every expert.

Usage: ``python benchmarks/attention_experts.py [--quick] [--threads 2] [--reps 11]``

``AttentionExperts`` (mixture of attention heads, JetMoE / BAM) gives each expert its own query
and output projection and shares the keys and values. For each shape it times (median ms of
interleaved reps after warmup; fwd = no-grad forward, f+b = forward + backward) the layer with

* **sorted** (``dispatch = "sorted"``, what generated models run): the (token, slot) rows sorted
  by expert and projected with grouped GEMMs, only the chosen experts' FLOPs;
* **dense** (``dispatch = "dense"``, what the exported static form runs): one GEMM over every
  expert's projection, E / top_k times the FLOPs.

The two outputs and gradients are checked against each other first.
"""

from __future__ import annotations

import sys

import torch
from ab_timing import ab_columns, ab_header, interleaved_medians, load_runtime, parse_args, shape_columns

rt = load_runtime()

FULL_SHAPES = [  # (E, top_k, batch, seq, dim, heads, head_dim)
    (4, 1, 2, 512, 512, 8, 64),
    (8, 2, 2, 512, 512, 8, 64),
    (16, 2, 2, 512, 512, 8, 64),
    (8, 2, 1, 64, 512, 8, 64),
]
QUICK_SHAPES = [(8, 2, 2, 32, 64, 4, 16)]


def bench(shape, reps: int) -> dict:
    E, top_k, batch, seq, dim, heads, head_dim = shape
    torch.manual_seed(0)
    attn = rt.AttentionExperts(dim, heads, heads, head_dim, E, top_k)
    x = torch.randn(batch, seq, dim, requires_grad=True)
    params = list(attn.parameters())

    def fwd():
        with torch.no_grad():
            attn(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        y, aux, _ = attn(x)
        (y.sum() + aux).backward()

    outputs = {}
    for dispatch in ("sorted", "dense"):
        attn.dispatch = dispatch
        y, _, _ = attn(x)
        outputs[dispatch] = (y.detach(), torch.autograd.grad(y.sum(), [x, *params]))
    torch.testing.assert_close(outputs["sorted"][0], outputs["dense"][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outputs["sorted"][1], outputs["dense"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)

    def use(dispatch):
        return lambda: setattr(attn, "dispatch", dispatch)

    return interleaved_medians({d: use(d) for d in ("sorted", "dense")}, {"fwd": fwd, "f+b": fwd_bwd}, reps)


def main(argv=None) -> int:
    quick, reps = parse_args(argv, __doc__.splitlines()[0], full_reps=11)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    print(f"AttentionExperts, fp32, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"median of {reps} interleaved reps (ms)")
    print(f"{'E':>3} {'k':>2} {'batch':>5} {'seq':>5} {'dim':>5} {'heads':>5} {'hd':>4} | "
          f"{ab_header('sorted', 'dense')}")
    for shape in shapes:
        ms = bench(shape, reps)
        print(shape_columns(shape, (3, 2, 5, 5, 5, 5, 4)) +
              f" | {ab_columns(ms, 'sorted', 'dense')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
