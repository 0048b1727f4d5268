"""The Triton target's MoE layer vs the PyTorch target's vs a dense-GEMM floor (GPU only).

Usage::

    python benchmarks/triton_moe.py [--configs mixtral,deepseek] [--tokens 1024,4096,16384]
                                    [--dtype bf16|fp16|fp32] [--reps 20]

For each configuration a one-layer `.moe` file holding only an MoE sublayer is compiled for both
targets; the Triton module gets the PyTorch module's state dict. It prints tokens/s of a forward
and of a forward+backward for:

* **pytorch**: the PyTorch target (sort by expert, grouped GEMMs, index_add combine);
* **triton**: the Triton target (fused router, on-device alignment, gather/scatter in the GEMMs);
* **floor**: one dense `torch.mm` with the FLOPs of the expert GEMMs (T * k rows of [d] x [d, 3f]
  then [f] x [f, d]); fwd+bwd runs the two backward products as well (3x the forward FLOPs).

and the ratios triton/pytorch and triton/floor (tokens/s; higher is better, the floor bounds
triton from above). The outputs of both targets are compared once per configuration.

On a machine without a CUDA GPU it says so and exits 0 (the kernels' correctness is checked on a
CPU by the test suite under TRITON_INTERPRET=1, which says nothing about speed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

import torch

CONFIGS = {  # name: (d, f, experts, k, shared)
    "mixtral": (1024, 3584, 8, 2, 0),
    "deepseek": (1024, 512, 64, 6, 2),
}

LAYER = """
model bench_{name} {{
  input(dim = {d})
  expert ffn = glu({d}, {f}, act = silu)
  block layer {{
    moe {{
      experts {e} x ffn
{shared}      router top_k(k = {k}, renormalize = true)
    }}
  }}
  layers {{ layer }}
}}
"""


def _import(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(name: str, out: str):
    """(pytorch model, triton model) of one configuration with the same weights."""
    import moec
    from moec.cli import main

    d, f, e, k, shared = CONFIGS[name]
    path = os.path.join(out, f"{name}.moe")
    with open(path, "w") as fh:
        fh.write(LAYER.format(name=name, d=d, f=f, e=e, k=k,
                              shared=f"      shared {shared} x ffn\n" if shared else ""))
    target = os.path.join(out, name)
    if main(["compile", path, "--target", "triton", "-o", target]) != 0:
        raise SystemExit(1)
    # imported by name in dependency order (RUNTIME_MODULES order, the Triton launcher, the kernels)
    from moec.backends.pytorch.codegen import RUNTIME_MODULES

    order = [*RUNTIME_MODULES, "moec_triton"]
    files = [f for f in os.listdir(target) if f.startswith("moec_") or f.endswith("_kernels.py")]
    for file in sorted(files, key=lambda f: order.index(f[:-3]) if f[:-3] in order else len(order)):
        _import(file[:-3], os.path.join(target, file))
    generated = _import(f"bench_triton_{name}", os.path.join(target, f"bench_{name}.py"))
    ref = moec.load(path)
    tri = generated.Model()
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def timed(fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` CUDA-event-timed runs after warmup."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def floors(rows: int, d: int, f: int, dtype: torch.dtype):
    """Dense GEMMs with the FLOPs of the expert GEMMs: (forward, forward + backward)."""
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    xa, w1, w2, h = rand(rows, d), rand(d, 2 * f), rand(f, d), rand(rows, f)
    g1, g2 = rand(rows, 2 * f), rand(rows, d)

    def forward():
        torch.mm(xa, w1)  # gate and up projections
        torch.mm(h, w2)  # down projection

    def forward_backward():
        forward()
        torch.mm(g1, w1.t())  # dx
        torch.mm(xa.t(), g1)  # dW of the first projections
        torch.mm(g2, w2.t())  # dh
        torch.mm(h.t(), g2)  # dW of the last projection

    return forward, forward_backward


def fwd(model, x):
    def go():
        with torch.no_grad():
            model(x)
    return go


def fwd_bwd(model, x):
    xg = x.detach().requires_grad_(True)

    def go():
        model.zero_grad(set_to_none=True)
        out = model(xg)
        (out.output.float().square().mean() + out.aux_loss).backward()
    return go


def run(config: str, tokens: list[int], dtype: torch.dtype, reps: int) -> None:
    d, f, e, k, shared = CONFIGS[config]
    with tempfile.TemporaryDirectory() as out:
        ref, tri = build(config, out)
    ref, tri = ref.cuda().to(dtype), tri.cuda().to(dtype)
    print(f"\n{config}: d={d} f={f} E={e} k={k} shared={shared} {dtype}")
    print(f"{'T':>7} {'pass':>8} {'pytorch tok/s':>14} {'triton tok/s':>13} {'floor tok/s':>12} "
          f"{'tri/pt':>7} {'tri/floor':>9}")
    for T in tokens:
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        with torch.no_grad():
            a, b = ref(x).output.float(), tri(x).output.float()
        err = (a - b).abs().max().item() / a.abs().max().clamp_min(1e-6).item()
        floor_fwd, floor_bwd = floors(T * (k + shared), d, f, dtype)
        for label, mk, floor in (("fwd", fwd, floor_fwd), ("fwd+bwd", fwd_bwd, floor_bwd)):
            t_pt, t_tri, t_fl = timed(mk(ref, x), reps), timed(mk(tri, x), reps), timed(floor, reps)
            print(f"{T:>7} {label:>8} {T / t_pt:>14.0f} {T / t_tri:>13.0f} {T / t_fl:>12.0f} "
                  f"{t_pt / t_tri:>7.2f} {t_fl / t_tri:>9.2f}")
        print(f"{'':>7} max |triton - pytorch| / max |pytorch| = {err:.2e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="mixtral,deepseek")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("benchmarks/triton_moe.py needs a CUDA GPU (and TRITON_INTERPRET unset): the Triton "
              "interpreter on a CPU checks numerics, not speed. Nothing measured.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/triton_moe.py needs triton: pip install 'moec[triton]'")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for config in args.configs.split(","):
        if config not in CONFIGS:
            print(f"unknown config {config!r}; configs: {', '.join(CONFIGS)}", file=sys.stderr)
            return 1
        run(config, [int(t) for t in args.tokens.split(",")], dtype, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
