"""moec Triton runtime: launches the generated kernels and wraps them in autograd Functions.

This file is copied verbatim next to generated model code as ``moec_triton.py``. It depends on
``torch`` and ``triton`` only (never on ``moec``); the kernels come from the model's generated
``<model>_kernels.py``, passed in as a module.

``fused_route(kernel, kernels, x, gate_weight, ...)`` -> ``(weights[T, k], expert_ids[T, k], probs[T, E],
logits[T, E], counts[E])``: one launch of a fused router kernel (gate GEMM, score function,
top-k with an optional selection-only bias, renormalisation, scaling, per-expert counts).
Tokens outside ``token_mask`` get expert id -1 and weight 0 and are not counted. Gradients of
``weights``, ``probs`` and ``logits`` flow to ``x`` and the gate weight (the backward recomputes
the score function from the saved logits in PyTorch).

``fused_experts(kernels, x, expert_ids, weights, up_proj, down_proj, gate_proj=None, ...)`` ->
``Tensor[T, d]`` = ``sum_j weights[t, j] * FFN_{expert_ids[t, j]}(x[t])`` (id -1: nothing),
the contract of ``moec_runtime.moe_experts``. Forward: align (one launch), up/gate GEMM with
the activation fused (one launch), down GEMM with the routing weight and the scatter to
(token, slot) order in its epilogue (one launch), a sum over the k slots. Backward: five
launches (dh and the activation backward, dx, and three grouped weight gradients). Buffer
sizes depend only on shapes (``T * k + E * (BLOCK_M - 1)`` rows at most), so nothing is read
back to the host: no host sync between the router and the combine, and no Python loop over
experts.

``LAUNCHES``: when a list is assigned to it, every launch appends ``(kernel name, grid)``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["LAUNCHES", "Blocks", "fused_experts", "fused_route", "merge_groups", "observe_counts"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCHES: list | None = None


class Blocks:
    """Tile sizes of the MoE layers: fixed ones from the .moe `target triton` section, the rest
    chosen by shape at call time. BLOCK_M fixes the alignment, so it is never autotuned."""

    def __init__(self, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 block_t: int | None = None):
        self.block_m, self.block_n, self.block_k, self.block_t = block_m, block_n, block_k, block_t

    def m(self, rows_per_expert: float) -> int:
        if self.block_m:
            return self.block_m
        if INTERPRET:  # the interpreter's cost is per program: large tiles
            return 64
        return 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64

    def n(self, width: int) -> int:
        return self.block_n or _tile(width, 256 if INTERPRET else 64)

    def k(self, width: int) -> int:
        return self.block_k or _tile(width, 128 if INTERPRET else 32)

    def t(self) -> int:
        return self.block_t or (64 if INTERPRET else 32)


def _tile(width: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(width)))


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    if LAUNCHES is not None:
        LAUNCHES.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, grid))
    kernel[grid](*args, **meta)


def _dot_dtype(t: Tensor):
    """fp32 tiles under the interpreter (it has no bf16 arithmetic) and for fp32 inputs."""
    if INTERPRET or t.dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(t.dtype, tl.float32)


def _gemm_tiles(kernels, block_n: int, block_k: int) -> dict:
    """Tile arguments of a forward GEMM launch: autotuned kernels pick BLOCK_N / BLOCK_K themselves."""
    return {} if kernels.TUNED_GEMM else {"BLOCK_N": block_n, "BLOCK_K": block_k}


# ---------------------------------------------------------------------------- routing
class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, kernel, kernels, spec, bias, mask, block_t):
        T, D = x.shape
        E = gate.shape[0]
        k = spec["k"]
        x = x.contiguous()
        gate = gate.contiguous()
        logits = torch.empty(T, E, device=x.device, dtype=torch.float32)
        probs = torch.empty_like(logits)
        weights = torch.empty(T, k, device=x.device, dtype=torch.float32)
        ids = torch.empty(T, k, device=x.device, dtype=torch.int64)
        counts = torch.zeros(E, device=x.device, dtype=torch.int32)
        if T:
            meta = {"BLOCK_D": _tile(D, 64)}
            if not kernels.TUNED_ROUTER:
                meta["BLOCK_T"] = block_t
            grid = (lambda m: (triton.cdiv(T, m["BLOCK_T"]),)) if kernels.TUNED_ROUTER else (triton.cdiv(T, block_t),)
            _launch(kernel, grid, x, gate, bias if bias is not None else logits, mask if mask is not None else ids,
                    logits, probs, weights, ids, counts, T, D, x.stride(0), gate.stride(0),
                    HAS_MASK=mask is not None, DOT_DTYPE=_dot_dtype(x), **meta)
        counts = counts.long()
        ctx.save_for_backward(x, gate, logits, ids)
        ctx.spec = spec
        ctx.mark_non_differentiable(ids, counts)
        return weights, ids, probs, logits, counts

    @staticmethod
    def backward(ctx, d_weights, _d_ids, d_probs, d_logits, _d_counts):
        x, gate, logits, ids = ctx.saved_tensors
        spec = ctx.spec
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            probs = torch.softmax(z, -1) if spec["score"] == "softmax" else torch.sigmoid(z)
            routed = ids >= 0
            w = probs.gather(1, ids.clamp(min=0)) * routed
            if spec["renormalize"]:
                denom = w.sum(-1, keepdim=True) + (1e-20 if spec["score"] == "sigmoid" else 0.0)
                w = w / torch.where(routed.any(-1, keepdim=True), denom, torch.ones_like(denom))
            w = w * spec["scale"]
            outs, grads = [], []
            for out, grad in ((w, d_weights), (probs, d_probs), (z, d_logits)):
                if grad is not None:
                    outs.append(out)
                    grads.append(grad)
            (dz,) = torch.autograd.grad(outs, [z], grads, allow_unused=True)
        if dz is None:
            dz = torch.zeros_like(logits)
        dz = dz.to(x.dtype)
        dx = dz @ gate if ctx.needs_input_grad[0] else None
        dgate = dz.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dgate, None, None, None, None, None, None


def fused_route(kernel, kernels, x: Tensor, gate_weight: Tensor, *, k: int, score: str, renormalize: bool,
          scale: float, bias: Tensor | None = None, token_mask: Tensor | None = None,
          blocks: Blocks | None = None):
    """Fused routing (see the module docstring). `kernel` is the model's router kernel for this
    router; `bias` ([E], selection only) for group-limited routers; `token_mask` ([T] bool)
    restricts routing to one modality group's tokens."""
    spec = {"k": k, "score": score, "renormalize": renormalize, "scale": scale}
    mask = token_mask.to(torch.int8).contiguous() if token_mask is not None else None
    if bias is not None:
        bias = bias.detach().float().contiguous()
    return _Route.apply(x, gate_weight, kernel, kernels, spec, bias, mask, (blocks or Blocks()).t())


def merge_groups(ids: list[Tensor], weights: list[Tensor], offsets: list[int]) -> tuple[Tensor, Tensor]:
    """The routing of disjoint modality groups (each routed over all tokens, -1 / 0 outside its
    own) as one routing in a shared expert-id space: group g's ids are shifted by offsets[g] and
    the slots padded to the largest k."""
    k = max(i.shape[1] for i in ids)
    merged_ids = torch.full((ids[0].shape[0], k), -1, dtype=torch.int64, device=ids[0].device)
    merged_w = torch.zeros((ids[0].shape[0], k), dtype=weights[0].dtype, device=ids[0].device)
    for i, w, off in zip(ids, weights, offsets):
        pad = k - i.shape[1]
        i = torch.nn.functional.pad(i, (0, pad), value=-1)
        merged_ids = torch.maximum(merged_ids, torch.where(i >= 0, i + off, i))
        merged_w = merged_w + torch.nn.functional.pad(w, (0, pad))
    return merged_ids, merged_w


def observe_counts(router, counts: Tensor) -> None:
    """A balancing router's training statistics (what `BalancedRouter.observe` gathers), from
    the counts the router kernel produced: no boolean indexing, so no host sync."""
    if router.training:
        with torch.no_grad():
            router.routed.add_(counts.to(router.routed.dtype))


# ---------------------------------------------------------------------------- experts
def _align(kernels, ids: Tensor, num_experts: int, block_m: int, counts: Tensor | None):
    """(sorted_ids, block_expert, offsets, padded_total), all on the device; sizes are worst cases."""
    N = ids.numel()
    flat = ids.reshape(-1).contiguous()
    if counts is None:  # routers that ran in PyTorch: count on the device
        counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
        counts.scatter_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int32))
    counts = counts.to(torch.int32).contiguous()
    rows = N + num_experts * (block_m - 1)
    sorted_ids = torch.empty(rows, dtype=torch.int64, device=ids.device)
    block_expert = torch.zeros(triton.cdiv(rows, block_m), dtype=torch.int64, device=ids.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=ids.device)
    total = torch.empty(1, dtype=torch.int64, device=ids.device)
    _launch(kernels.align_kernel, (num_experts,), flat, counts, sorted_ids, block_expert, offsets, total, N,
            E=num_experts, E_P2=triton.next_power_of_2(num_experts), BLOCK_M=block_m, SCAN=256)
    return sorted_ids, block_expert, offsets, total


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, up, down, gate, up_bias, down_bias, gate_bias, ids, counts, kernels, act, blocks,
                save):
        T, D = x.shape
        k = ids.shape[1]
        E, _, F = up.shape
        N = T * k
        glu, has_bias = gate is not None, up_bias is not None
        x = x.contiguous()
        up, down = up.contiguous(), down.contiguous()
        gate = gate.contiguous() if glu else up
        w_flat = weights.reshape(-1).contiguous()
        block_m = blocks.m(N / max(E, 1))
        sorted_ids, block_expert, offsets, total = _align(kernels, ids, E, block_m, counts)
        rows = sorted_ids.shape[0]
        m_blocks = block_expert.shape[0]
        dot = _dot_dtype(x)
        f32 = {"device": x.device, "dtype": torch.float32}
        h = torch.empty(rows, F, device=x.device, dtype=x.dtype)
        up_pre = torch.empty(rows, F, **f32) if save else h
        gate_pre = torch.empty(rows, F, **f32) if save and glu else up_pre
        ub = up_bias.contiguous() if has_bias else up
        gb = gate_bias.contiguous() if has_bias and glu else ub
        db = down_bias.contiguous() if has_bias else down
        bn, bk = blocks.n(F), blocks.k(D)
        grid = _grid(kernels, m_blocks, F, bn)
        _launch(kernels.expert_up_kernel, grid, x, sorted_ids, block_expert, total, up, gate, ub, gb,
                h, up_pre, gate_pre, N, D, F, k, x.stride(0), up.stride(0), up.stride(1), F,
                ACT=act, GLU=glu, HAS_BIAS=has_bias, SAVE=save, DOT_DTYPE=dot, BLOCK_M=block_m,
                **_gemm_tiles(kernels, bn, bk))
        y_pairs = torch.zeros(N, D, device=x.device, dtype=x.dtype)
        y_raw = torch.zeros(N, D, **f32) if save else y_pairs
        bn, bk = blocks.n(D), blocks.k(F)
        _launch(kernels.expert_down_kernel, _grid(kernels, m_blocks, D, bn), h, sorted_ids, block_expert, total,
                down, db, w_flat, y_pairs, y_raw, N, D, F, down.stride(0), down.stride(1), D,
                HAS_BIAS=has_bias, SAVE=save, DOT_DTYPE=dot, BLOCK_M=block_m,
                **_gemm_tiles(kernels, bn, bk))
        acc = torch.promote_types(x.dtype, torch.float32)
        y = y_pairs.view(T, k, D).to(acc).sum(1).to(x.dtype)  # the reduction over the k slots
        if save:
            ctx.save_for_backward(x, w_flat, up, down, gate, h, up_pre, gate_pre, y_raw, sorted_ids,
                                  block_expert, offsets, total)
        ctx.meta = (kernels, act, glu, has_bias, block_m, blocks, tuple(weights.shape), weights.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_flat, up, down, gate, h, up_pre, gate_pre, y_raw, sorted_ids, block_expert, offsets, total = \
            ctx.saved_tensors
        kernels, act, glu, has_bias, block_m, blocks, w_shape, w_dtype = ctx.meta
        T, D = x.shape
        k = w_shape[1]
        E, _, F = up.shape
        N = T * k
        rows, m_blocks = sorted_ids.shape[0], block_expert.shape[0]
        dot = _dot_dtype(x)
        dy = dy.contiguous()
        f32 = {"device": x.device, "dtype": torch.float32}
        # routing weights: d w[t, j] = <dy[t], unweighted expert output of pair (t, j)>
        d_weights = (dy.float().unsqueeze(1) * y_raw.view(T, k, D)).sum(-1).to(w_dtype)
        d_up = torch.empty(rows, F, **f32)
        d_gate = torch.empty(rows, F, **f32) if glu else d_up
        tiles = {"BLOCK_M": block_m, "DOT_DTYPE": dot}
        bn, bk = blocks.n(F), blocks.k(D)
        _launch(kernels.expert_down_dx_kernel, (m_blocks, triton.cdiv(F, bn)), dy, sorted_ids, block_expert,
                total, down, w_flat, up_pre, gate_pre, d_up, d_gate, N, D, F, k, dy.stride(0),
                down.stride(0), down.stride(1), ACT=act, GLU=glu, BLOCK_N=bn, BLOCK_K=bk, **tiles)
        dx_pairs = torch.zeros(N, D, **f32)
        bn, bk = blocks.n(D), blocks.k(F)
        _launch(kernels.expert_up_dx_kernel, (m_blocks, triton.cdiv(D, bn)), d_up, d_gate, sorted_ids, block_expert,
                total, up, gate, dx_pairs, N, D, F, up.stride(0), up.stride(1), GLU=glu, BLOCK_N=bn, BLOCK_K=bk,
                **tiles)
        dx = dx_pairs.view(T, k, D).sum(1).to(x.dtype)

        def wgrad(a, b, ka, nb, a_gather, b_gather, bias):
            dw = torch.empty(E, ka, nb, **f32)
            dbias = torch.empty(E, nb, **f32) if bias else dw
            bkk, bnn = blocks.k(ka), blocks.n(nb)
            _launch(kernels.expert_wgrad_kernel, (triton.cdiv(ka, bkk), triton.cdiv(nb, bnn), E), a, b, sorted_ids,
                    offsets, w_flat, dw, dbias, N, ka, nb, k, a.stride(0), b.stride(0), A_GATHER=a_gather,
                    B_GATHER=b_gather, HAS_BIAS=bias, BLOCK_N=bnn, BLOCK_K=bkk, **tiles)
            return dw.to(up.dtype), (dbias.to(up.dtype) if bias else None)

        d_down, d_down_bias = wgrad(h, dy, F, D, False, True, has_bias)
        d_upw, d_up_bias = wgrad(x, d_up, D, F, True, False, has_bias)
        d_gatew, d_gate_bias = wgrad(x, d_gate, D, F, True, False, has_bias) if glu else (None, None)
        return (dx, d_weights.view(w_shape), d_upw, d_down, d_gatew, d_up_bias, d_down_bias, d_gate_bias,
                None, None, None, None, None, None)


def _grid(kernels, m_blocks: int, width: int, block_n: int):
    if kernels.TUNED_GEMM:
        return lambda meta: (m_blocks, triton.cdiv(width, meta["BLOCK_N"]))
    return (m_blocks, triton.cdiv(width, block_n))


def fused_experts(kernels, x: Tensor, expert_ids: Tensor, weights: Tensor, up_proj: Tensor, down_proj: Tensor,
            gate_proj: Tensor | None = None, activation: str = "silu", up_bias: Tensor | None = None,
            down_bias: Tensor | None = None, gate_bias: Tensor | None = None,
            blocks: Blocks | None = None, counts: Tensor | None = None) -> Tensor:
    """Weighted mixture of expert FFNs on the Triton kernels (see the module docstring).
    `counts` ([E], from the router) saves recounting the routed pairs."""
    if activation not in kernels.ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no kernel in this model (has {kernels.ACTIVATIONS})")
    act = kernels.ACTIVATIONS.index(activation)
    if x.shape[0] == 0 or expert_ids.shape[1] == 0:
        return x * 0.0
    # pre-activations and unweighted outputs are kept only when a backward pass will need them
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weights, up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias))
    return _Experts.apply(x, weights, up_proj, down_proj, gate_proj, up_bias, down_bias, gate_bias,
                          expert_ids, counts, kernels, act, blocks or Blocks(), save)
