"""Resource and latency estimate of a generated project (`moec report --target hls`).

The model, stated in every report:
- Multipliers: every kernel call site is its own hardware. A linear layer computes `lanes` outputs
  in parallel with its input loop pipelined at II = reuse, so it needs ceil(lanes / reuse)
  multipliers; a ternary linear layer needs none in its reduction (add/subtract) and one for the
  per-matrix scale, applied to one output per cycle. A multiplier costs one DSP48 (27 x 18 bits) when the operands fit, more
  otherwise. Float units for per-token statistics (exp, sqrt, division) are counted separately.
- On-chip memory: on-chip weights at their declared width (ternary codes at 2 bits), activation
  buffers [max_tokens][dim], attention's Q/K/V/context buffers, routing queues (a 32-bit token index
  and a route_t weight per entry) and the on-chip copies
  of one expert's streamed (m_axi) matrices; BRAM18K = ceil(bits / 18432) with no partition overhead.
- Cycles per token: a linear layer takes ceil(n_out / lanes) * n_in * reuse cycles; norms 2 * dim,
  adds dim, attention averages (max_tokens + 1) / 2 keys per query (causal); a token passes its own
  group's router and visits k experts of that group (a group's router and experts weighted by its
  share of modalities, assuming a uniform mix); streamed
  experts add their weight loads amortised over max_tokens tokens. Pipeline fill, control and
  interface overheads are ignored, so this is a lower bound on latency.
"""

from __future__ import annotations

import math

from .model import LinearShape, Project, route_type

BRAM18K_BITS = 18 * 1024


def _dsp_per_mult(project: Project) -> int:
    a, w = project.config.activations.width, project.config.weights.width
    big, small = max(a, w), min(a, w)
    return math.ceil(big / 27) * math.ceil(small / 18)


def _linear(project: Project, cname: str) -> LinearShape:
    return next(shape for shape in project.linears if shape.cname == cname)


def _cycles(shape: LinearShape, ternary: bool = False) -> int:
    """Cycles of one token; a ternary layer scales its `lanes` outputs one per cycle after each block."""
    return math.ceil(shape.n_out / shape.lanes) * (shape.n_in * shape.reuse + (shape.lanes if ternary else 0))


def estimate(project: Project) -> dict:
    cfg = project.config
    wa, ww = cfg.activations.width, cfg.weights.width
    queue_entry = 32 + route_type(project)[0]  # token index (int) and routing weight (route_t)
    n_mod = max(1, len(project.modalities))
    rows = []
    for s in project.steps:
        a = s.args
        mults = scale_mults = float_units = 0
        cycles = 0.0
        memory = 0
        if s.kind == "norm":
            float_units, cycles = 2, 2 * a["dim"]
        elif s.kind == "add":
            cycles = a["dim"]
        elif s.kind == "attention":
            q, k, o = (_linear(project, a[c]) for c in ("qc", "kc", "oc"))
            mults = q.multipliers + 2 * k.multipliers + o.multipliers
            keys = (cfg.max_tokens + 1) / 2 if a["causal"] else cfg.max_tokens
            cycles = _cycles(q) + 2 * _cycles(k) + _cycles(o) + a["heads"] * keys * 2 * a["head_dim"]
            float_units = 3
            memory = cfg.max_tokens * (2 * q.n_out + 2 * k.n_out) * wa
        elif s.kind == "route_top_k":
            g = _linear(project, a["gc"])
            share = a["mask"].bit_count() / n_mod  # the kernel skips the tokens of other groups
            mults, cycles, float_units = g.multipliers, share * (_cycles(g) + a["experts"]), 2
            memory = a["experts"] * cfg.max_tokens * queue_entry
        elif s.kind == "route_fixed":
            cycles = 1
            memory = a["experts"] * cfg.max_tokens * queue_entry
        elif s.kind in ("experts", "ffn"):
            up, down = _linear(project, a["upc"]), _linear(project, a["downc"])
            mats = 3 if a["glu"] else 2
            n_up = mats - 1
            if a["ternary"]:
                scale_mults = mats  # one per matrix
            else:
                mults = n_up * up.multipliers + down.multipliers
            float_units = 1
            share = a["mask"].bit_count() / n_mod if s.kind == "ffn" else _group_mask(project, s).bit_count() / n_mod
            k = _experts_per_token(project, s) if s.kind == "experts" else 1
            per_visit = n_up * _cycles(up, a["ternary"]) + _cycles(down, a["ternary"]) + a["hidden"] + a["dim"]
            cycles = share * k * per_visit
            if s.kind == "experts" and a["stream"]:
                loads = min(a["experts"], cfg.max_tokens * k)
                cycles += share * loads * mats * a["dim"] * a["hidden"] / cfg.max_tokens
                memory = mats * a["dim"] * a["hidden"] * (2 if a["ternary"] else ww)
        rows.append({"step": s.comment, "kind": s.kind, "multipliers": mults, "scale_multipliers": scale_mults,
                     "float_units": float_units, "cycles_per_token": cycles, "buffer_bits": memory})
    weight_bits = sum(w.size * (2 if w.ctype == "tern_t" else ww) for w in project.onchip_weights)
    offchip_bits = sum(w.size * (2 if w.ctype == "tern_t" else ww) for w in project.offchip_weights)
    buffer_bits = sum(project.buffer_dims[b] for b in project.buffers) * cfg.max_tokens * wa
    buffer_bits += sum(r["buffer_bits"] for r in rows)
    mults = sum(r["multipliers"] for r in rows)
    scale_mults = sum(r["scale_multipliers"] for r in rows)
    cycles = sum(r["cycles_per_token"] for r in rows)
    return {
        "model": project.name, "precision": {"weights": str(cfg.weights), "activations": str(cfg.activations),
                                             "accumulators": str(cfg.accumulators)},
        "reuse": cfg.reuse, "max_tokens": cfg.max_tokens, "max_unroll": cfg.max_unroll, "clock_ns": cfg.clock,
        "part": cfg.part, "steps": rows,
        "multipliers": mults, "scale_multipliers": scale_mults,
        "dsp": (mults + scale_mults) * _dsp_per_mult(project),
        "float_units": sum(r["float_units"] for r in rows),
        "onchip_weight_bits": weight_bits, "offchip_weight_bits": offchip_bits, "buffer_bits": buffer_bits,
        "bram18k": math.ceil((weight_bits + buffer_bits) / BRAM18K_BITS),
        "cycles_per_token": round(cycles),
        "tokens_per_second": 1e9 / (cycles * cfg.clock) if cycles else 0.0,
    }


def _queue_step(project: Project, experts_step):
    return next(s for s in project.steps
                if s.kind in ("route_top_k", "route_fixed") and s.args["queue"] == experts_step.args["queue"])


def _group_mask(project: Project, experts_step) -> int:
    return _queue_step(project, experts_step).args["mask"]


def _experts_per_token(project: Project, experts_step) -> int:
    route = _queue_step(project, experts_step)
    return route.args["k"] if route.kind == "route_top_k" else 1


def _kib(bits: int) -> str:
    return f"{bits / 8 / 1024:,.1f} KiB"


def format_estimate(e: dict) -> str:
    lines = [f"HLS estimate for {e['model']} (part {e['part']}, {e['clock_ns']} ns clock)",
             (f"precision: weights {e['precision']['weights']}, activations {e['precision']['activations']}, "
             f"accumulators {e['precision']['accumulators']}"),
             f"reuse factor {e['reuse']}, max_tokens {e['max_tokens']}, at most {e['max_unroll']} unrolled lanes",
             "",
             f"{'step':<58} {'mults':>7} {'scale':>6} {'cycles/token':>13}"]
    for r in e["steps"]:
        if r["kind"] == "output":
            continue
        lines.append(f"{r['step'][:58]:<58} {r['multipliers']:>7} {r['scale_multipliers']:>6} "
                     f"{r['cycles_per_token']:>13,.0f}")
    lines += ["",
              (f"multipliers: {e['multipliers']:,} in multiply-accumulates, {e['scale_multipliers']:,} for ternary "
              f"scales -> {e['dsp']:,} DSP48"),
              f"float units (exp, sqrt, division for per-token statistics): {e['float_units']}",
              (f"on-chip memory: weights {_kib(e['onchip_weight_bits'])}, buffers {_kib(e['buffer_bits'])} "
              f"-> {e['bram18k']:,} BRAM18K"),
              f"off-chip (m_axi) weights: {_kib(e['offchip_weight_bits'])}",
              f"latency: {e['cycles_per_token']:,} cycles per token -> {e['tokens_per_second']:,.0f} tokens/s",
              "",
              ("model: each kernel call site is separate hardware; a linear layer has ceil(lanes / reuse) "
              "multipliers and takes ceil(n_out / lanes) * n_in * reuse cycles; ternary reductions add and "
              "subtract only; a token passes only its group's router and visits k experts of that group (uniform "
              "modality mix); routing queues hold a 32-bit token index and a route_t weight; streamed expert "
              "weights are loaded once per layer and amortised over max_tokens; BRAM18K = bits / 18432 "
              "without partition overhead; pipeline fill and interfaces are ignored (a lower bound).")]
    return "\n".join(lines)
