"""One generated MoE layer vs a transformers-style naive loop vs GEMM floors (fp32, CPU).

Usage::

    python benchmarks/moe_layer.py [--quick] [--tokens 64,256,1024,4096] [--configs mixtral,olmoe]
                                   [--threads 2] [--budget 12] [--no-mem]

(``--tokens 8192`` works too; at T=8192 the full grid takes roughly twice as long.)

For each configuration a one-layer ``.moe`` file holding ONLY an MoE sublayer (no attention) is
written to a temp dir and loaded with ``moec.load``; the generated model is RMSNorm -> MoE ->
residual add -> final RMSNorm.  On the same inputs and the same parameter tensors it times:

* **generated**: ``model(x, modality)`` under ``torch.no_grad()`` (fwd) and
  ``loss = out.output.sum() + out.aux_loss; loss.backward()`` with ``x.requires_grad`` (fwd+bwd).
* **naive**: the same layer written the way HF Mixtral/OLMoE blocks do it (router linear, softmax,
  top-k, optional renormalisation, ``for e in range(E): tok, slot = torch.where(ids == e)``, the
  expert FFN with plain ``x @ W``, ``index_add_``), plus the same norms/residual/shared experts,
  on the generated module's parameters except that each expert has its own weight tensors (copies
  of the stacked [E, d, f] ones), as HF's per-expert ``nn.Linear`` layers do (``naive_params``).
  Its output and gradients are checked against the generated module once per (config, T); a
  mismatch is printed and the script exits with status 1.
* **floor**: the expert FFNs alone (the GEMMs + the SwiGLU ``silu(g) * u``, nothing else) on token
  rows already gathered and sorted by expert outside the timed region, with per-expert leaf
  weights: best of (a) one ``mm`` per expert over ``torch.split``, (b) ``torch._grouped_mm``
  over stacked weights (if it runs for fp32 on this build) and, for fwd+bwd, (c) the same with the
  stacked weight gradients one ``mm`` per expert into memory kept between steps instead of
  ``torch._grouped_mm``'s fresh allocations ("grouped_kept").  Shared experts (DeepSeek-like) run
  as one dense FFN on all tokens.  fwd+bwd = ``torch.autograd.backward(outputs, fixed grads)``
  (input and weight gradients).  No routing, gather, scatter, combine or norms.
* **the MoE alone**: the generated layer's block with its RMSNorm replaced by the identity,
  fwd+bwd of ``block(x)`` (routing, permutation, expert GEMMs, combine and the residual add, on
  the same parameter tensors): the part the 1.10x target speaks of.  It is compared with the floor
  less the floor's own page faults.
* **where the rest goes**: the layer's two RMSNorms and residual alone (fwd+bwd, the generated
  model's own norm modules), and the minor page faults of a step (counted with ``getrusage``
  around every timed call) times the cost of one fault on a fresh anonymous mapping: glibc maps
  allocations of 32 MiB and more afresh each time, e.g. the stacked weight gradients of
  ``torch._grouped_mm``'s backward (the generated split path reuses its gradient memory across
  steps and takes none).  The fault cost is an upper estimate: a step that takes 32k faults
  (OLMoE-like, T=64) measured about 20 ms slower than one that takes none, i.e. ~0.6 us per
  fault, against ~0.8-1.0 us on a fresh mapping.
* **dense mm**: one ``torch.mm`` [M, d] @ [d, 3f] with exactly the FLOPs of the expert GEMMs
  (M = T * (k + shared)), as a GFLOP/s reference for the machine.

FLOPs counted = the expert GEMMs (routed + shared): 6 * d * f per (token, expert) in the forward;
router and norms are not counted.  Times are medians over interleaved rounds (all methods of one
(config, T) alternate, so background load hits them alike) after warmup; in each round a method
runs three times in a row and the last two runs are timed, as a training loop repeats the same
step (the first run after another method pays for re-mapping freed memory, which a steady loop
does not).  The methods run in a new random order every round: the generated and naive layers
share their weight tensors, so in a fixed order the one that runs second always finds them in
the cache that the one before it warmed.  The number of rounds is chosen from the warmup time so that each (config, T) takes
about ``--budget`` seconds.  Every
round also times a fixed 512x512x1024 ``mm`` ("calib"); rows whose calib rate is below 75% of the
run's best are marked ``~`` (other processes were using the cores: with 2 OpenMP threads on 2
busy cores, small ops can get 10-100x slower), and should be rerun on an idle machine.

Peak memory: each (config, T, method) runs in a fresh subprocess (two at a time, after all timing)
that builds the model, warms the method up at T=8 (one-time costs such as lazy imports and the
runtime's grouped_mm probe are reported separately as "init MB"), clears the gradients, calls
``malloc_trim(0)``, builds the inputs, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and reads the current RSS (baseline), then
runs one no-grad forward and reads the peak RSS (``VmHWM`` in ``/proc/self/status``), then one
fwd+bwd and reads it again.  Reported MB = peak RSS minus baseline, i.e. the transient memory of
the call: activations, autograd buffers, parameter gradients (the same size for both methods) and
glibc allocator caching; parameters and inputs are in the baseline.  (``ru_maxrss`` is not usable:
a child started by ``subprocess`` inherits the parent's high-water mark.  Checked: allocating
3 x 50 MB, freeing them and allocating 100 MB reads as +150 MB.)

``THP_MEM_ALLOC_ENABLE=1 python benchmarks/moe_layer.py`` puts PyTorch's CPU allocations of 2 MB or
more on transparent huge pages: far fewer page faults for the fresh weight gradients, but on this
machine some rows then stall in the kernel's page compaction (measured: Mixtral-like T=256 fwd+bwd
37.0 -> 31.8 ms, MoMa-like T=64 21.6 -> 49.5 ms); the header line says which way a run was made.

Targets checked at the end: fwd+bwd within 1.10x of the floor at T >= 1024 (the whole layer, and
the MoE alone, measured); fwd GFLOP/s >= 85%
of dense mm at T >= 2048; never slower than naive (fwd at every T, fwd+bwd at T >= 256); fwd at
least 1.3x faster than naive at T <= 64; fwd+bwd peak memory <= naive.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import ctypes
import gc
import json
import mmap
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import moec
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Config:
    name: str
    E: int  # routed experts per group
    k: int  # experts per token (per group)
    d: int
    f: int
    shared: int = 0  # shared experts (DeepSeek-like), each of width f
    groups: tuple = ()  # modality groups (MoMa-like); tokens split evenly between them
    renormalize: bool = False


FULL = [
    Config("mixtral", E=8, k=2, d=512, f=1024, renormalize=True),
    Config("olmoe", E=64, k=8, d=512, f=256),
    Config("deepseek", E=64, k=6, d=512, f=256, shared=2),
    Config("moma", E=4, k=1, d=512, f=1024, groups=("text", "image")),
]
QUICK = [
    Config("mixtral", E=8, k=2, d=64, f=128, renormalize=True),
    Config("olmoe", E=16, k=4, d=64, f=32),
    Config("deepseek", E=16, k=3, d=64, f=32, shared=2),
    Config("moma", E=4, k=1, d=64, f=128, groups=("text", "image")),
]
FULL_TOKENS = [64, 256, 1024, 4096]
QUICK_TOKENS = [32, 128]


# --------------------------------------------------------------------------- the .moe file


def moe_source(c: Config) -> str:
    router = f"router top_k(k = {c.k}, score = softmax, renormalize = {str(c.renormalize).lower()})"
    lines = ["model bench {", f"  const d = {c.d}, f = {c.f}"]
    if c.groups:
        lines.append(f"  modality {', '.join(c.groups)}")
        lines.append(f"  input(dim = d, modalities = [{', '.join(c.groups)}])")
    else:
        lines.append("  input(dim = d)")
    lines.append("  expert swiglu = glu(d, f, act = silu)")
    if c.groups:
        body = "\n".join(f"    group {g} {{ experts {c.E} x swiglu; {router} }}" for g in c.groups)
    else:
        body = f"    experts {c.E} x swiglu\n"
        if c.shared:
            body += f"    shared {c.shared} x swiglu\n"
        body += f"    {router}"
    lines += ["  block b {", "    moe {", body, "    }", "  }", "  layers { b }", "}", ""]
    return "\n".join(lines)


def load_model(c: Config, tmpdir: str):
    path = Path(tmpdir) / f"{c.name}_{c.E}_{c.k}_{c.d}_{c.f}_{c.shared}.moe"
    path.write_text(moe_source(c))
    return moec.load(str(path))


def make_inputs(c: Config, T: int):
    g = torch.Generator().manual_seed(1234 + T)
    x = torch.randn(T, c.d, generator=g)
    modality = None
    if c.groups:
        n = len(c.groups)
        modality = (torch.arange(T) * n // max(T, 1)).long()  # equal shares ...
        modality = modality[torch.randperm(T, generator=g)]  # ... interleaved at random
    return x, modality


# --------------------------------------------------------------------------- naive reference


def naive_route(P: dict, prefix: str, c: Config, h):
    """HF-style routing: router linear, softmax (fp32), top-k, optional renormalisation."""
    logits = h @ P[prefix + "router.weight"].t()
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, c.k, dim=-1)
    if c.renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(h.dtype), ids


EXPERT_STACKS = ("up_proj", "gate_proj", "down_proj")


def naive_params(P: dict) -> dict:
    """The naive loop's parameters: the generated module's own tensors, except that every stacked
    [E, d, f] expert weight becomes a tuple of E separate leaf tensors (copies), as HF's
    per-expert ``nn.Linear`` weights are: their gradients are E small tensors, not one stacked
    tensor that autograd would allocate (and glibc map afresh) every step."""
    return {n: tuple(w.detach().clone().requires_grad_() for w in p.unbind(0))
            if n.rsplit(".", 1)[-1] in EXPERT_STACKS and ".experts." in n else p for n, p in P.items()}


def naive_leaves(PN: dict) -> list:
    return [t for p in PN.values() for t in (p if isinstance(p, tuple) else (p,))]


def naive_sparse(P: dict, prefix: str, c: Config, h):
    """Mixtral/OLMoE sparse block: loop over experts, where() masks, index_add_.  ``P`` from
    ``naive_params`` (per-expert weights)."""
    w, ids = naive_route(P, prefix, c, h)
    up, gate, down = (P[prefix + f"experts.{n}"] for n in ("up_proj", "gate_proj", "down_proj"))
    out = torch.zeros_like(h)
    for e in range(c.E):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        xe = h[tok]
        ye = (F.silu(xe @ gate[e]) * (xe @ up[e])) @ down[e]
        out.index_add_(0, tok, ye * w[tok, slot, None])
    return out


def naive_forward(P: dict, c: Config, eps: tuple, x, modality):
    pre = "layers.0."
    h = F.rms_norm(x, (c.d,), P[pre + "moe_norm.weight"], eps[0])
    if c.groups:
        y = torch.zeros_like(h)
        for gi, g in enumerate(c.groups):
            idx = (modality == gi).nonzero().squeeze(1)
            y.index_add_(0, idx, naive_sparse(P, f"{pre}moe.{g}.", c, h[idx]))
    else:
        y = naive_sparse(P, pre + "moe.", c, h)
        if c.shared:
            s = pre + "moe.shared."
            y = y + F.linear(F.silu(F.linear(h, P[s + "gate_proj.weight"])) * F.linear(h, P[s + "up_proj.weight"]),
                             P[s + "down_proj.weight"])
    return F.rms_norm(x + y, (c.d,), P["final_norm.weight"], eps[1])


def norm_eps(model) -> tuple:
    return (model.layers[0].moe_norm.eps, model.final_norm.eps)


def moe_block(model) -> torch.nn.Module:
    """The model's MoE block with its RMSNorm replaced by the identity, on the same parameter
    tensors: ``block(x, modality, task) -> (x + moe(x), aux_loss, expert_counts)``."""
    block = copy.copy(model.layers[0])
    block._modules = dict(block._modules, moe_norm=torch.nn.Identity())
    return block


# --------------------------------------------------------------------------- floors


def _ffn(xs, up, gate, down, mm):
    return mm(F.silu(mm(xs, gate)) * mm(xs, up), down)


_GMM_OK: bool | None = None


def grouped_mm_runs() -> bool:
    """Whether torch._grouped_mm runs fp32 fwd+bwd on this CPU build and matches a loop of mm."""
    global _GMM_OK
    if _GMM_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(10, 8, generator=g, requires_grad=True)
            b = torch.randn(3, 8, 4, generator=g, requires_grad=True)
            offs = torch.tensor([3, 3, 10], dtype=torch.int32)
            y = torch._grouped_mm(a, b, offs=offs)
            y.backward(torch.ones_like(y))  # (a y.sum() grad is stride-0, which grouped_mm's bwd rejects)
            ref = torch.cat([a[:3] @ b[0], a[3:] @ b[2]])
            _GMM_OK = bool(torch.allclose(y, ref, atol=1e-5)) and a.grad is not None and b.grad is not None
        except Exception:  # noqa: BLE001 - any failure means "not available"
            _GMM_OK = False
    return _GMM_OK


class Floors:
    """Expert FFN GEMM floors on pre-sorted rows, and the dense-mm FLOP reference."""

    def __init__(self, P: dict, c: Config, eps: tuple, x, modality):
        pre = "layers.0."
        with torch.no_grad():
            h = F.rms_norm(x, (c.d,), P[pre + "moe_norm.weight"], eps[0])
            groups = [(f"{pre}moe.{g}.", (modality == gi).nonzero().squeeze(1)) for gi, g in enumerate(c.groups)]
            if not groups:
                groups = [(pre + "moe.", torch.arange(x.shape[0]))]
            rows, sizes, ups, gates, downs = [], [], [], [], []
            for prefix, idx in groups:
                hg = h[idx]
                _, ids = naive_route(P, prefix, c, hg)
                flat = ids.reshape(-1)
                order = torch.argsort(flat, stable=True)
                rows.append(hg[order // c.k])
                sizes += torch.bincount(flat, minlength=c.E).tolist()
                ups.append(P[prefix + "experts.up_proj"])
                gates.append(P[prefix + "experts.gate_proj"])
                downs.append(P[prefix + "experts.down_proj"])
            self.sizes = sizes
            self.xs = torch.cat(rows).contiguous().requires_grad_()
            self.up = torch.cat(ups).clone().requires_grad_()
            self.gate = torch.cat(gates).clone().requires_grad_()
            self.down = torch.cat(downs).clone().requires_grad_()
            # per-expert leaf weights for the split floor (no unbind/stack in the graph)
            self.w_split = [tuple(t[e].clone().requires_grad_() for t in (self.up, self.gate, self.down))
                            for e in range(len(sizes))]
            self.offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
            self.kept_grads = tuple(torch.empty_like(t) for t in (self.up, self.gate, self.down))
            self.shared = None
            if c.shared:
                s = pre + "moe.shared."
                self.h = h.clone().requires_grad_()
                self.shared = tuple(P[s + n + ".weight"].t().contiguous().requires_grad_()
                                    for n in ("up_proj", "gate_proj", "down_proj"))
                self.g_shared = torch.randn_like(h)
            n = self.xs.shape[0]
            self.g_rows = torch.randn(n, c.d)
            self.g_split = list(torch.split(self.g_rows, sizes))
            M = x.shape[0] * (c.k + c.shared)  # same FLOPs as routed + shared expert GEMMs
            self.dense_a = torch.randn(M, c.d)
            self.dense_b = torch.randn(c.d, 3 * c.f)
        self.flops_fwd = 2.0 * M * c.d * 3 * c.f

    def leaves(self):
        ls = [self.xs, self.up, self.gate, self.down] + [w for ws in self.w_split for w in ws]
        if self.shared:
            ls += [self.h, *self.shared]
        return ls

    def _shared(self):
        if self.shared is None:
            return [], []
        up, gate, down = self.shared
        return [_ffn(self.h, up, gate, down, torch.mm)], [self.g_shared]

    def split(self):
        outs, grads = self._shared()
        for xe, ge, n, (up, gate, down) in zip(torch.split(self.xs, self.sizes), self.g_split,
                                               self.sizes, self.w_split):
            if n:
                outs.append(_ffn(xe, up, gate, down, torch.mm))
                grads.append(ge)
        return outs, grads

    def grouped(self):
        outs, grads = self._shared()
        outs.append(_ffn(self.xs, self.up, self.gate, self.down,
                         lambda a, b: torch._grouped_mm(a, b, offs=self.offs)))
        grads.append(self.g_rows)
        return outs, grads

    def grouped_kept(self):
        outs, grads = self._shared()
        outs.append(_GroupedKeptFFN.apply(self.xs, self.up, self.gate, self.down, self.offs, self.sizes,
                                          self.kept_grads))
        grads.append(self.g_rows)
        return outs, grads

    def dense_mm(self):
        return torch.mm(self.dense_a, self.dense_b)


class _GroupedKeptFFN(torch.autograd.Function):
    """The expert FFNs on pre-sorted rows as ``torch._grouped_mm`` for the activations and their
    gradients, with the stacked weight gradients written one ``mm`` per expert into memory kept
    between calls (``kept``: up, gate, down buffers): ``torch._grouped_mm``'s own backward
    allocates them afresh every step, which costs page faults on the CPU."""

    @staticmethod
    def forward(ctx, xs, up, gate, down, offs, sizes, kept):
        g, u = torch._grouped_mm(xs, gate, offs=offs), torch._grouped_mm(xs, up, offs=offs)
        ctx.save_for_backward(xs, g, u, up, gate, down)
        ctx.offs, ctx.sizes, ctx.kept = offs, sizes, kept
        return torch._grouped_mm(F.silu(g) * u, down, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        xs, g, u, up, gate, down = ctx.saved_tensors
        offs, sizes = ctx.offs, ctx.sizes
        s = torch.sigmoid(g)
        a = g * s
        dh = torch._grouped_mm(dy, down.transpose(1, 2), offs=offs)
        du, dg = dh * a, dh * u * s * (1 + g * (1 - s))
        for buf, lhs, rhs in zip(ctx.kept, (xs, xs, a * u), (du, dg, dy)):
            for be, le, re, n in zip(buf.unbind(0), lhs.split(sizes), rhs.split(sizes), sizes):
                torch.mm(le.t(), re, out=be) if n else be.zero_()
        dxs = torch._grouped_mm(du, up.transpose(1, 2), offs=offs) + torch._grouped_mm(dg, gate.transpose(1, 2),
                                                                                     offs=offs)
        return dxs, *(t.detach() for t in ctx.kept), None, None, None  # aliases: autograd adopts them


# --------------------------------------------------------------------------- timing

CALIB_A, CALIB_B = torch.randn(512, 512), torch.randn(512, 1024)
CALIB_FLOPS = 2.0 * 512 * 512 * 1024
NOISY = 0.75  # a row whose calibration mm ran below this fraction of the run's best is marked "~"


def clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def time_round_robin(fns: dict, budget_s: float, min_reps: int, max_reps: int) -> tuple[dict, dict, int]:
    """fns: name -> (prep, run).  Warm up, pick the rep count from the warmup time, then take the
    median (ms) of interleaved rounds; only `run` is timed.  In every round each method runs
    three times in a row and the last two are timed: a training loop calls the same layer step
    after step, and the first call after another method re-establishes the allocator's state
    (which heap memory is mapped), so it is not counted.  Also returns the median number of
    minor page faults of a timed call, per method.

    The methods run in a new (seeded) random order every round. The generated and naive layers
    read the same weight tensors, and the floor reads its own copies: whichever method reads
    the weights first after the floor finds them evicted from the cache and stays slower for a
    few calls (measured: MoMa-like T=64, the first forward after the floor takes 4.7, 4.0, 3.4,
    3.1 ms on successive calls against a steady 2.9 ms, whichever method it is). A fixed order,
    or a rotation of one, would charge that to the same method in every round."""
    t0 = time.perf_counter()
    for prep, run in fns.values():  # warmup round 1 (also the rep-count estimate)
        prep()
        run()
    t_round = 3 * (time.perf_counter() - t0)
    reps = max(min_reps, min(max_reps, int(budget_s / max(t_round, 1e-9))))
    samples = {name: [] for name in fns}
    faults = {name: [] for name in fns}
    names, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(names)  # a new order every round: see the docstring
        for name in names:
            prep, run = fns[name]
            prep()
            run()
            for _ in range(2):
                prep()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - t) * 1e3)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return ({name: statistics.median(v) for name, v in samples.items()},
            {name: statistics.median(v) for name, v in faults.items()}, reps)


def page_fault_ms(pages: int = 16384) -> float:
    """Cost of one first-touch page fault (ms, kernel zeroing included): fill a fresh anonymous
    mapping, minus the same fill once its pages are mapped."""
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as buf:
        view = torch.frombuffer(buf, dtype=torch.float32)
        t = time.perf_counter()
        view.fill_(1.0)
        fresh = time.perf_counter() - t
        t = time.perf_counter()
        view.fill_(2.0)
        mapped = time.perf_counter() - t
        del view
    return max(0.0, fresh - mapped) * 1e3 / pages


def check_naive(model, P, PN, c, eps, x, modality) -> str | None:
    """Compare the naive loop (parameters ``PN``) with the generated module (output and gradients);
    error text or None."""
    params, naive = list(P.values()), naive_leaves(PN)
    xg = x.clone().requires_grad_()
    clear_grads(params)
    out = model(xg, modality)
    (out.output.sum() + out.aux_loss).backward()
    ref_y, ref_gx = out.output.detach(), xg.grad
    ref_g = {n: p.grad.clone() for n, p in P.items() if p.grad is not None}
    xn = x.clone().requires_grad_()
    clear_grads(params)
    clear_grads(naive)
    y = naive_forward(PN, c, eps, xn, modality)
    y.sum().backward()
    errs = []
    tol = {"rtol": 1e-4, "atol": 1e-4}
    if not torch.allclose(y.detach(), ref_y, **tol):
        errs.append(f"output max|diff| = {(y.detach() - ref_y).abs().max().item():.3g}")
    if not torch.allclose(xn.grad, ref_gx, **tol):
        errs.append(f"d/dx max|diff| = {(xn.grad - ref_gx).abs().max().item():.3g}")
    for n, g in ref_g.items():
        if isinstance(PN[n], tuple):  # per-expert weights: experts without tokens have no gradient
            pg = torch.stack([torch.zeros_like(t) if t.grad is None else t.grad for t in PN[n]])
        else:
            pg = PN[n].grad
        if pg is None or not torch.allclose(pg, g, rtol=1e-3, atol=1e-4):
            diff = "missing" if pg is None else f"max|diff| = {(pg - g).abs().max().item():.3g}"
            errs.append(f"d/d{n} {diff}")
    clear_grads(params)
    clear_grads(naive)
    return "; ".join(errs) or None


def bench_one(model, c: Config, T: int, budget_s: float, min_reps: int, max_reps: int,
              fault_ms: float = 0.0) -> dict:
    P = dict(model.named_parameters())
    params = list(P.values())
    eps = norm_eps(model)
    x, modality = make_inputs(c, T)
    PN = naive_params(P)
    err = check_naive(model, P, PN, c, eps, x, modality)
    if err:
        return {"error": err}
    trained = params + naive_leaves(PN)  # gradients cleared before every fwd+bwd
    floors = Floors(P, c, eps, x, modality)
    xg = x.clone().requires_grad_()
    flo_leaves = floors.leaves()

    def nothing():
        pass

    def prep_train():
        clear_grads(trained)
        xg.grad = None

    def gen_fwd():
        with torch.no_grad():
            model(x, modality)

    def gen_fb():
        out = model(xg, modality)
        (out.output.sum() + out.aux_loss).backward()

    def naive_fwd():
        with torch.no_grad():
            naive_forward(PN, c, eps, x, modality)

    def naive_fb():
        naive_forward(PN, c, eps, xg, modality).sum().backward()

    def floor_fwd(kind):
        def run():
            with torch.no_grad():
                getattr(floors, kind)()
        return run

    def floor_fb(kind):
        def run():
            outs, grads = getattr(floors, kind)()
            torch.autograd.backward(outs, grads)
        return run

    def prep_floor():
        clear_grads(flo_leaves)

    def dense():
        floors.dense_mm()

    norms = (model.layers[0].moe_norm, model.final_norm)

    def wrapper_fb():  # the layer without its MoE (norm -> residual -> final norm), fwd+bwd
        norms[1](xg + norms[0](xg)).sum().backward()

    block = moe_block(model)
    block_modality = modality if modality is not None else torch.zeros(T, dtype=torch.long)

    def moe_fb():  # the MoE and its residual add alone: the block with its norm as the identity
        out, aux, _ = block(xg, block_modality, None)
        (out.sum() + aux).backward()

    def calib():  # fixed-size mm in every round: a machine-load indicator comparable across rows
        torch.mm(CALIB_A, CALIB_B)

    kinds = {"fwd": ["split"] + (["grouped"] if grouped_mm_runs() else [])}  # grouped_kept: grouped's fwd
    kinds["fb"] = kinds["fwd"] + (["grouped_kept"] if grouped_mm_runs() else [])
    fns = {"gen_fwd": (nothing, gen_fwd), "naive_fwd": (nothing, naive_fwd), "dense": (nothing, dense),
           "calib": (nothing, calib)}
    fns.update({f"floor_{kd}_fwd": (nothing, floor_fwd(kd)) for kd in kinds["fwd"]})
    fns.update({"gen_fb": (prep_train, gen_fb), "naive_fb": (prep_train, naive_fb),
                "wrapper_fb": (prep_train, wrapper_fb), "moe_fb": (prep_train, moe_fb)})
    fns.update({f"floor_{kd}_fb": (prep_floor, floor_fb(kd)) for kd in kinds["fb"]})
    ms, faults, reps = time_round_robin(fns, budget_s, min_reps, max_reps)
    clear_grads(trained + flo_leaves)

    def best(suffix):
        name = min(kinds[suffix], key=lambda kd: ms[f"floor_{kd}_{suffix}"])
        return ms[f"floor_{name}_{suffix}"], name

    res = {k: v for k, v in ms.items() if not k.startswith("floor_")}
    res["floor_fwd"], res["floor_fwd_kind"] = best("fwd")
    res["floor_fb"], res["floor_fb_kind"] = best("fb")
    res["floor_split_fb"] = ms["floor_split_fb"]
    res["floor_grouped_fb"] = ms.get("floor_grouped_fb")
    res["floor_grouped_kept_fb"] = ms.get("floor_grouped_kept_fb")
    res["gen_fb_faults"], res["floor_fb_faults"] = faults["gen_fb"], faults[f"floor_{res['floor_fb_kind']}_fb"]
    res["gen_fb_fault_ms"] = res["gen_fb_faults"] * fault_ms
    res["floor_fb_nofault"] = res["floor_fb"] - res["floor_fb_faults"] * fault_ms  # compared like for like
    res["flops_fwd"] = floors.flops_fwd
    res["calib_gflops"] = CALIB_FLOPS / ms["calib"] / 1e6
    res["reps"] = reps
    return res


# --------------------------------------------------------------------------- peak memory


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        st = dict(line.split(":", 1) for line in fh if ":" in line)
    return int(st["VmRSS"].split()[0]) / 1024.0, int(st["VmHWM"].split()[0]) / 1024.0


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the baseline RSS holds live data only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_child(spec: dict) -> None:
    """Runs in a fresh interpreter; prints peak-RSS deltas (MB) of one no-grad fwd and one fwd+bwd.

    A warmup at T=8 (no-grad fwd, then fwd+bwd) first pays the one-time costs (lazy imports,
    the runtime's grouped_mm probe, kernel set-up); the no-grad part is reported as init_mb."""
    torch.set_num_threads(spec["threads"])
    c = Config(**{**spec["config"], "groups": tuple(spec["config"]["groups"])})
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(c, tmp)
    P = dict(model.named_parameters())
    eps = norm_eps(model)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))  # start the thread pool
    if spec["method"] == "generated":
        leaves = list(P.values())

        def fwd(inp, modality):
            out = model(inp, modality)
            return out.output + out.aux_loss / out.output.numel()  # so .sum() == output.sum() + aux
    else:
        PN = naive_params(P)
        leaves = naive_leaves(PN)

        def fwd(inp, modality):
            return naive_forward(PN, c, eps, inp, modality)

    xw, mw = make_inputs(c, 8)
    gc.collect()
    _reset_peak_rss()
    base = _rss_mb()[0]
    with torch.no_grad():
        fwd(xw, mw)
    init_mb = _rss_mb()[1] - base
    fwd(xw.clone().requires_grad_(), mw).sum().backward()
    clear_grads(leaves)
    if spec["method"] == "generated":  # the step below allocates its weight gradients, as naive's does
        sys.modules["moec_runtime"].free_gradient_buffers()
    del xw, mw

    x, modality = make_inputs(c, spec["T"])
    xg = x.clone().requires_grad_()
    gc.collect()
    _malloc_trim()
    _reset_peak_rss()
    base = _rss_mb()[0]
    with torch.no_grad():
        fwd(x, modality)
    r_fwd = _rss_mb()[1]
    fwd(xg, modality).sum().backward()
    r_fb = _rss_mb()[1]
    print(json.dumps({"fwd_mb": r_fwd - base, "fb_mb": r_fb - base, "init_mb": init_mb}))


def measure_memory(jobs: list[tuple], threads: int, parallel: int) -> dict:
    """jobs: (config, T, method) -> {"fwd_mb", "fb_mb"} via one fresh subprocess each."""

    def run(job):
        c, T, method = job
        spec = {"config": asdict(c), "T": T, "method": method, "threads": threads}
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--mem-child", json.dumps(spec)],
                           check=False, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            return job, {"error": p.stderr.strip().splitlines()[-1:] or ["?"]}
        return job, json.loads(p.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        return dict(pool.map(run, jobs))


# --------------------------------------------------------------------------- report


def fmt(v, spec=".1f", width=8) -> str:
    return f"{'-' if v is None else format(v, spec):>{width}}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'config':<9}{'T':>6} | {'gen':>8}{'naive':>8}{'floor':>8} | {'gen':>8}{'naive':>8}{'floor':>8}"
            f" | {'gen/':>6}{'naive/':>7}{'naive/':>7} | {'gen fwd':>8} | {'peak MB f+b':>13}")
    sub = (f"{'':<9}{'':>6} | {'fwd ms':>8}{'fwd ms':>8}{'fwd ms':>8} | {'f+b ms':>8}{'f+b ms':>8}"
           f"{'f+b ms':>8} | {'floor':>6}{'gen':>7}{'gen':>7} | {'% dense':>8} | {'gen':>6}{'naive':>7}")
    sub2 = (f"{'':<9}{'':>6} | {'':>24} | {'':>24} | {'f+b':>6}{'fwd':>7}{'f+b':>7} | {'GFLOP/s':>8} |")
    print(head)
    print(sub)
    print(sub2)
    print("-" * len(head))
    for r in rows:
        name = r["config"] + ("~" if r["noisy"] else "")
        print(f"{name:<9}{r['T']:>6} | {fmt(r['gen_fwd'], '.2f')}{fmt(r['naive_fwd'], '.2f')}"
              f"{fmt(r['floor_fwd'], '.2f')} | {fmt(r['gen_fb'], '.2f')}{fmt(r['naive_fb'], '.2f')}"
              f"{fmt(r['floor_fb'], '.2f')} | {fmt(r['gen_floor_fb'], '.2f', 6)}"
              f"{fmt(r['naive_gen_fwd'], '.2f', 7)}{fmt(r['naive_gen_fb'], '.2f', 7)} | "
              f"{fmt(r['pct_dense'], '.0f', 7)}% | {fmt(r.get('mem_gen'), '.0f', 6)}"
              f"{fmt(r.get('mem_naive'), '.0f', 7)}")


def print_details(rows: list[dict]) -> None:
    print("\ndetails: GFLOP/s (expert GEMM FLOPs / time; f+b counts 3x the fwd FLOPs), floor variant picked"
          " (split = per-expert mm, grouped = torch._grouped_mm, grouped_kept = grouped_mm with the weight"
          " gradients one mm per expert into kept memory), reps, calib = GFLOP/s of a fixed 512x512x1024"
          " mm timed in every round (load indicator), no-grad fwd peak MB, one-time MB of the first call in a"
          " process")
    print(f"{'config':<9}{'T':>6} | {'dense':>7}{'gen fwd':>8}{'gen f+b':>8}{'floor f+b':>10} | "
          f"{'floor fwd/f+b':>21}{'split f+b':>10}{'grpd f+b':>9}{'kept f+b':>9} | {'reps':>4}{'calib':>6} | {'fwd MB gen':>10}"
          f"{'naive':>7} | {'init MB gen':>11}{'naive':>7}")
    for r in rows:
        gf = r["flops_fwd"] / 1e6
        print(f"{r['config']:<9}{r['T']:>6} | {fmt(gf / r['dense'], '.1f', 7)}{fmt(gf / r['gen_fwd'], '.1f')}"
              f"{fmt(3 * gf / r['gen_fb'], '.1f')}{fmt(3 * gf / r['floor_fb'], '.1f', 10)} | "
              f"{r['floor_fwd_kind'] + '/' + r['floor_fb_kind']:>21}{fmt(r['floor_split_fb'], '.2f', 10)}"
              f"{fmt(r['floor_grouped_fb'], '.2f', 9)}{fmt(r['floor_grouped_kept_fb'], '.2f', 9)} | {r['reps']:>4}{fmt(r['calib_gflops'], '.0f', 6)} | "
              f"{fmt(r.get('mem_gen_fwd'), '.0f', 10)}"
              f"{fmt(r.get('mem_naive_fwd'), '.0f', 7)} | {fmt(r.get('mem_gen_init'), '.0f', 11)}"
              f"{fmt(r.get('mem_naive_init'), '.0f', 7)}")
    print("\nwhere the generated fwd+bwd goes beyond the floor (ms): norms = the layer's two RMSNorms and"
          " residual alone (fwd+bwd); faults = the minor page faults of one fwd+bwd (median count) times the"
          " cost of one on a fresh mapping (large fresh allocations that glibc maps anew, e.g. the stacked weight"
          " gradients of torch._grouped_mm's backward; an upper estimate: inside the step a fault measured ~0.6"
          " us); MoE = the block with its norm as the identity, measured: routing, permutation, expert GEMMs,"
          " combine and residual; MoE/floor compares it with the floor less the floor's own faults")
    print(f"{'config':<9}{'T':>6} | {'gen f+b':>8}{'norms':>8}{'faults':>8}{'(count)':>9}{'MoE':>8} | "
          f"{'floor':>8}{'faults':>8}{'(count)':>9} | {'gen/floor':>9}{'MoE/floor':>10}")
    for r in rows:
        print(f"{r['config']:<9}{r['T']:>6} | {fmt(r['gen_fb'], '.1f')}{fmt(r['wrapper_fb'], '.1f')}"
              f"{fmt(r['gen_fb_fault_ms'], '.1f')}{fmt(r['gen_fb_faults'], '.0f', 9)}{fmt(r['moe_fb'], '.1f')} | "
              f"{fmt(r['floor_fb'], '.1f')}{fmt(r['floor_fb'] - r['floor_fb_nofault'], '.1f')}"
              f"{fmt(r['floor_fb_faults'], '.0f', 9)} | "
              f"{fmt(r['gen_floor_fb'], '.2f', 9)}{fmt(r['moe_fb'] / r['floor_fb_nofault'], '.2f', 10)}")


def print_targets(rows: list[dict], have_mem: bool) -> None:
    targets = [
        ("fwd+bwd <= 1.10x floor (T >= 1024)", lambda r: r["T"] >= 1024,
         lambda r: (r["gen_floor_fb"] <= 1.10, f"{r['gen_floor_fb']:.2f}x")),
        ("  (the same for the MoE alone, measured: the block without its RMSNorms)",
         lambda r: r["T"] >= 1024,
         lambda r: (r["moe_fb"] <= 1.10 * r["floor_fb_nofault"], f"{r['moe_fb'] / r['floor_fb_nofault']:.2f}x")),
        ("fwd GFLOP/s >= 85% of dense mm (T >= 2048)", lambda r: r["T"] >= 2048,
         lambda r: (r["pct_dense"] >= 85, f"{r['pct_dense']:.0f}%")),
        ("fwd never slower than naive (all T)", lambda r: True,
         lambda r: (r["gen_fwd"] <= r["naive_fwd"], f"naive/gen {r['naive_gen_fwd']:.2f}")),
        ("fwd+bwd never slower than naive (T >= 256)", lambda r: r["T"] >= 256,
         lambda r: (r["gen_fb"] <= r["naive_fb"], f"naive/gen {r['naive_gen_fb']:.2f}")),
        ("fwd >= 1.3x faster than naive (T <= 64)", lambda r: r["T"] <= 64,
         lambda r: (r["naive_gen_fwd"] >= 1.3, f"naive/gen {r['naive_gen_fwd']:.2f}")),
    ]
    if have_mem:
        targets.append(("fwd+bwd peak memory <= naive", lambda r: r.get("mem_gen") is not None,
                        lambda r: (r["mem_gen"] <= r["mem_naive"],
                                   f"{r['mem_gen']:.0f} vs {r['mem_naive']:.0f} MB")))
    print("\ntargets:")
    for title, applies, check in targets:
        cases = [(r, *check(r)) for r in rows if applies(r)]
        if not cases:
            print(f"  [n/a ] {title}: no row applies")
            continue
        fails = [(r, why) for r, ok, why in cases if not ok]
        tag = "PASS" if not fails else "FAIL"
        print(f"  [{tag}] {title}: {len(cases) - len(fails)}/{len(cases)} rows pass")
        for r, why in fails:
            print(f"           {r['config']} T={r['T']}: {why}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and T (< 30 s)")
    ap.add_argument("--tokens", type=str, default=None, help="comma-separated T values, e.g. 64,1024,8192")
    ap.add_argument("--configs", type=str, default=None, help="comma-separated subset of config names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per (config, T)")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--mem-child", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        mem_child(json.loads(args.mem_child))
        return 0

    torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else FULL
    if args.configs:
        wanted = args.configs.split(",")
        configs = [c for c in configs if c.name in wanted]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else FULL_TOKENS)
    budget = args.budget if args.budget is not None else (0.25 if args.quick else 10.0)
    min_reps, max_reps = (3, 11) if args.quick else (5, 41)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    print(f"moe_layer benchmark: torch {torch.__version__}, {cpu}, {os.cpu_count()} cpus, "
          f"threads={torch.get_num_threads()}, fp32, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"grouped_mm fp32 runs on this build: {grouped_mm_runs()}; timing budget {budget:.1f} s per (config, T), "
          f"median of interleaved reps; fwd = no_grad forward, f+b = forward + backward of "
          f"output.sum() + aux_loss")
    print("layer: RMSNorm -> MoE -> residual -> final RMSNorm;  " + "; ".join(
        f"{c.name}: E={c.E}{'x' + str(len(c.groups)) + ' groups' if c.groups else ''}"
        f"{' +' + str(c.shared) + ' shared' if c.shared else ''} k={c.k} d={c.d} f={c.f}" for c in configs))
    fault_ms = statistics.median(page_fault_ms() for _ in range(5))
    print(f"one first-touch page fault costs {fault_ms * 1e3:.2f} us here (fresh anonymous mapping)")
    print(flush=True)

    rows = []
    failed = False
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # compile everything first: fail fast on a bad compiler
        models = {c: load_model(c, tmp) for c in configs}
    for c in configs:
        model = models.pop(c)
        for T in tokens:
            res = bench_one(model, c, T, budget, min_reps, max_reps, fault_ms)
            if "error" in res:
                print(f"!!! MISMATCH {c.name} T={T}: naive loop != generated module: {res['error']}",
                      file=sys.stderr, flush=True)
                print(f"!!! MISMATCH {c.name} T={T}: {res['error']}", flush=True)
                failed = True
                continue
            res.update(config=c.name, T=T, cfg=c)
            res["gen_floor_fb"] = res["gen_fb"] / res["floor_fb"]
            res["naive_gen_fwd"] = res["naive_fwd"] / res["gen_fwd"]
            res["naive_gen_fb"] = res["naive_fb"] / res["gen_fb"]
            res["pct_dense"] = 100.0 * res["dense"] / res["gen_fwd"]
            rows.append(res)
            print(f"  {c.name:<9} T={T:<6} gen fwd {res['gen_fwd']:8.2f} ms  f+b {res['gen_fb']:8.2f} ms  "
                  f"naive fwd {res['naive_fwd']:8.2f}  f+b {res['naive_fb']:8.2f}  floor f+b "
                  f"{res['floor_fb']:8.2f}  ({res['reps']} reps, {time.perf_counter() - t_start:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f})",
                  flush=True)
    have_mem = not args.no_mem and bool(rows)
    if have_mem:
        # --quick: only the largest T of mixtral and moma (each subprocess costs ~2-3 s of start-up)
        picked = [r for r in rows if not args.quick or (r["T"] == tokens[-1] and r["config"] in ("mixtral", "moma"))]
        jobs = [(r["cfg"], r["T"], m) for r in picked for m in ("generated", "naive")]
        print(f"\nmeasuring peak memory: {len(jobs)} fresh subprocesses, 2 at a time ...", flush=True)
        mem = measure_memory(jobs, args.threads, parallel=2)
        for r in rows:
            for m, key in (("generated", "gen"), ("naive", "naive")):
                got = mem.get((r["cfg"], r["T"], m))
                if got and "error" not in got:
                    r[f"mem_{key}"], r[f"mem_{key}_fwd"] = got["fb_mb"], got["fwd_mb"]
                    r[f"mem_{key}_init"] = got["init_mb"]
                elif got:
                    print(f"  memory measurement failed for {r['config']} T={r['T']} {m}: {got['error']}")
    best_cal = max((r["calib_gflops"] for r in rows), default=0.0)
    for r in rows:
        r["noisy"] = r["calib_gflops"] < NOISY * best_cal
    load = os.getloadavg()
    print(f"\nresults (ms, median; load average now {load[0]:.2f}; total {time.perf_counter() - t_start:.0f} s)")
    print_table(rows)
    print_details(rows)
    print_targets(rows, have_mem)
    noisy = [f"{r['config']} T={r['T']}" for r in rows if r["noisy"]]
    if noisy:
        print(f"\n~ = disturbed by other load (calibration mm < {NOISY:.0%} of the best row's "
              f"{best_cal:.0f} GFLOP/s): {', '.join(noisy)}; rerun those when the machine is idle")
    if failed:
        print("\nFAILED: the naive loop does not match the generated module (see MISMATCH lines above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
