"""An independent, deliberately plain reference for generated models.

It reads the checked ModelSpec (not the IR, not the generated code) and the generated model's
parameters by name, and computes the forward pass with explicit per-token / per-expert loops
and textbook formulas. Tests compare generated modules against it in float64.
"""

from __future__ import annotations

import math

import torch
from moec import ops as O


def act(name: str, x):
    return {"silu": lambda v: v * torch.sigmoid(v),
            "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
            "gelu_tanh": lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
            "relu": lambda v: torch.clamp(v, min=0),
            "identity": lambda v: v}[name](x)


def norm(op: O.NormOp, p: dict, prefix: str, x):
    w = p[f"{prefix}.weight"]
    if op.norm == "rms":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + op.eps) * w
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + op.eps) * w + p[f"{prefix}.bias"]


def linear(p, prefix, x):
    y = x @ p[f"{prefix}.weight"].T
    return y + p[f"{prefix}.bias"] if f"{prefix}.bias" in p else y


def by_modality(fn, prefix: str, x, names):
    """Mixture-of-Transformers: token t goes through fn(f"{prefix}.{names[t]}", row) (names: the
    modality name of every token of x, flattened); None applies fn(prefix, x) to all tokens."""
    if names is None:
        return fn(prefix, x)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.stack([fn(f"{prefix}.{n}", r) for n, r in zip(names, rows)])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def rms_vector(u, weight, eps: float):
    return u / torch.sqrt((u * u).mean() + eps) * weight


def rotate(u, pos: int, theta: float | None):
    """Rotate-half rotary embedding of one head vector u at position pos (none when theta is None)."""
    if theta is None:
        return u
    hd = u.shape[0]
    out = u.clone()
    for i in range(hd // 2):  # the angle in float32, as transformers (and the runtime) compute it
        inv_freq = 1.0 / torch.tensor(theta, dtype=torch.float32) ** torch.tensor(2 * i / hd)
        angle = torch.tensor(float(pos), dtype=torch.float32) * inv_freq
        c, s = float(angle.cos()), float(angle.sin())
        out[i] = u[i] * c - u[i + hd // 2] * s
        out[i + hd // 2] = u[i + hd // 2] * c + u[i] * s
    return out


def attention(op: O.AttentionOp, p: dict, prefix: str, x, names=None, positions=None):
    """Per sequence of x [..., seq, d], head by head: q/k norms (per head or per projection),
    rotary at `positions` (0..seq-1 unless given), causal or full softmax attention."""
    seq = x.shape[-2]
    xs = x.reshape(-1, seq, x.shape[-1])
    positions = list(range(seq)) if positions is None else positions
    out = torch.zeros(xs.shape[0], seq, op.heads * op.head_dim, dtype=x.dtype)
    hd = op.head_dim

    def proj(name, v):
        return by_modality(lambda pre, r: linear(p, pre, r), f"{prefix}.{name}", v, names)

    def heads_of(u, n, norm_name):  # [seq, n * hd] -> n tensors [seq, hd], normed and rotated
        rows = []
        for t in range(seq):
            v = u[t]
            if op.qk_norm == "projection":
                v = rms_vector(v, p[f"{prefix}.{norm_name}.weight"], op.norm_eps)
            parts = [v[h * hd:(h + 1) * hd] for h in range(n)]
            if op.qk_norm == "head":
                parts = [rms_vector(w, p[f"{prefix}.{norm_name}.weight"], op.norm_eps) for w in parts]
            rows.append([rotate(w, positions[t], op.rope_theta) for w in parts])
        return [torch.stack([r[h] for r in rows]) for h in range(n)]

    q, k, v = proj("q_proj", xs), proj("k_proj", xs), proj("v_proj", xs)
    group = op.heads // op.kv_heads
    for b in range(xs.shape[0]):
        qs, ks = heads_of(q[b], op.heads, "q_norm"), heads_of(k[b], op.kv_heads, "k_norm")
        for h in range(op.heads):
            kv = h // group
            vh = v[b, :, kv * hd:(kv + 1) * hd]
            scores = qs[h] @ ks[kv].T / math.sqrt(hd)
            if op.causal:
                mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
                scores = scores.masked_fill(mask, float("-inf"))
            out[b, :, h * hd:(h + 1) * hd] = torch.softmax(scores, -1) @ vh
    if op.routed_heads is not None:  # mixture-of-heads: each token weights its heads
        weights = [[head_weights(op, p, prefix, xs[b, t]) for t in range(seq)] for b in range(xs.shape[0])]
        scale = torch.stack([torch.stack([torch.stack(w).repeat_interleave(op.head_dim) for w in row])
                             for row in weights])
        out = out * scale
    return proj("o_proj", out).reshape(x.shape)


def highest(scores, k: int) -> list[int]:
    """The indices of the k highest of a 1-D tensor of scores, highest first, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i].detach()), i))[:k]


def head_weights(op: O.AttentionOp, p: dict, prefix: str, x) -> list:
    """Mixture-of-heads weights of one token x [d]: a softmax over the shared heads and one over the
    routed heads keeping the top routed_heads (others 0), mixed by a 2-way softmax."""
    routed = torch.softmax(x @ p[f"{prefix}.head_router.weight"].T, -1)
    chosen = highest(routed, op.routed_heads)
    routed_w = [routed[h] if h in chosen else routed[h] * 0 for h in range(len(routed))]
    if not op.shared_heads:
        return routed_w
    mix = torch.softmax(x @ p[f"{prefix}.head_mix.weight"].T, -1)
    shared = torch.softmax(x @ p[f"{prefix}.shared_router.weight"].T, -1)
    return [mix[0] * s for s in shared] + [mix[1] * r for r in routed_w]


def attention_experts(op: O.AttentionExpertsOp, p: dict, prefix: str, x):
    """Attention experts, token by token: softmax router, top_k experts; expert e's query of token t
    (x_t W_q[e], q-norm, rotary at position t) attends over the shared keys / values of positions
    0..t (all positions when not causal); its output projection W_o[e], weighted by the gate.
    Returns (output, aux loss, tokens per expert)."""
    seq, d = x.shape[-2], x.shape[-1]
    xs = x.reshape(-1, seq, d)
    hd, group, E = op.head_dim, op.heads // op.kv_heads, op.num_experts

    def rms(u, name):
        return rms_vector(u, p[f"{prefix}.{name}.weight"], op.norm_eps)

    def heads_of(u, n, norm_name):  # split a projection into n head vectors, normed as configured
        if op.qk_norm == "projection":
            u = rms(u, norm_name)
        parts = [u[h * hd:(h + 1) * hd] for h in range(n)]
        return [rms(v, norm_name) for v in parts] if op.qk_norm == "head" else parts

    out = torch.zeros_like(xs)
    count = torch.zeros(E, dtype=torch.long)
    probs_all, logits_all = [], []
    for b in range(xs.shape[0]):
        keys = [[rotate(v, s, op.rope_theta) for v in heads_of(linear(p, f"{prefix}.k_proj", xs[b, s]), op.kv_heads, "k_norm")]
                for s in range(seq)]
        values = [linear(p, f"{prefix}.v_proj", xs[b, s]) for s in range(seq)]
        for t in range(seq):
            logits = xs[b, t] @ p[f"{prefix}.router.weight"].T
            probs = torch.softmax(logits, -1)
            logits_all.append(logits)
            probs_all.append(probs)
            top = highest(probs, op.top_k)
            gates = [probs[e] for e in top]
            if op.renormalize:
                total = sum(gates)
                gates = [g / total for g in gates]
            for e, g in zip(top, gates):
                count[e] += 1
                q = xs[b, t] @ p[f"{prefix}.q_proj"][e]
                if op.bias:
                    q = q + p[f"{prefix}.q_bias"][e]
                context = []
                for h, qh in enumerate(heads_of(q, op.heads, "q_norm")):
                    qh, kv = rotate(qh, t, op.rope_theta), h // group
                    visible = range(t + 1) if op.causal else range(seq)
                    scores = torch.stack([qh @ keys[s][kv] / math.sqrt(hd) for s in visible])
                    a = torch.softmax(scores, -1)
                    context.append(sum(a[j] * values[s][kv * hd:(kv + 1) * hd] for j, s in enumerate(visible)))
                o = torch.cat(context) @ p[f"{prefix}.o_proj"][e]
                if op.o_bias:
                    o = o + p[f"{prefix}.o_bias"][e]
                out[b, t] = out[b, t] + g * o
    aux = torch.zeros((), dtype=x.dtype)
    if op.losses.load_balance:
        f = count.to(x.dtype) / max(int(count.sum()), 1)
        aux = aux + op.losses.load_balance * E * (f * torch.stack(probs_all).mean(0)).sum()
    if op.losses.z_loss:
        aux = aux + op.losses.z_loss * (torch.stack([torch.logsumexp(lg, -1) for lg in logits_all]) ** 2).mean()
    return out.reshape(x.shape), aux, count


def ternary(w):
    """Absmean ternary quantisation with a straight-through gradient, written out plainly."""
    scale = max(float(w.detach().abs().mean()), 1e-8)
    q = torch.tensor([[max(-1.0, min(1.0, round(float(v) / scale))) * scale for v in row] for row in w.detach()],
                     dtype=w.dtype)
    return w + (q - w).detach()


def maybe_ternary(e: O.ExpertSpec, w):
    return ternary(w) if e.weights == "ternary" else w


def dense_ffn(e: O.ExpertSpec, p: dict, prefix: str, x):
    def lin(name, v):
        y = v @ maybe_ternary(e, p[f"{prefix}.{name}.weight"]).T
        return y + p[f"{prefix}.{name}.bias"] if f"{prefix}.{name}.bias" in p else y

    up = lin("up_proj", x)
    if e.form == "glu":
        hidden = act(e.act, lin("gate_proj", x)) * up
    else:
        hidden = act(e.act, up)
    return lin("down_proj", hidden)


def expert_weight(e: O.ExpertSpec, p: dict, prefix: str, name: str, i: int):
    """Matrix `name` (up / gate / down) of expert i: stacked, or a LoRA expert's W0 + (alpha/r) A_i B_i."""
    if e.lora_rank is None:
        return maybe_ternary(e, p[f"{prefix}.{name}_proj"][i])
    if not e.adapted(name):
        return p[f"{prefix}.base.{name}_proj"][0]
    scale = (e.lora_alpha or e.lora_rank) / e.lora_rank
    return p[f"{prefix}.base.{name}_proj"][0] + scale * (p[f"{prefix}.{name}_lora_a"][i] @ p[f"{prefix}.{name}_lora_b"][i])


def expert_bias(e: O.ExpertSpec, p: dict, prefix: str, name: str, i: int):
    return p[f"{prefix}.base.{name}_bias"][0] if e.lora_rank is not None else p[f"{prefix}.{name}_bias"][i]


def expert(e: O.ExpertSpec, p: dict, prefix: str, i: int, x):
    """Expert i of stacked weights, one token row x [d]."""
    up = x @ expert_weight(e, p, prefix, "up", i)
    if e.bias:
        up = up + expert_bias(e, p, prefix, "up", i)
    if e.form == "glu":
        gate = x @ expert_weight(e, p, prefix, "gate", i)
        if e.bias:
            gate = gate + expert_bias(e, p, prefix, "gate", i)
        hidden = act(e.act, gate) * up
    else:
        hidden = act(e.act, up)
    y = hidden @ expert_weight(e, p, prefix, "down", i)
    return y + expert_bias(e, p, prefix, "down", i) if e.bias else y


def temperature(value, step: int) -> float:
    """A router temperature at a training step: a number, or a linear / half-cosine schedule."""
    if not isinstance(value, O.ScheduleSpec):
        return value
    p = min(step / value.steps, 1.0)
    if value.kind == "linear":
        return value.start + (value.end - value.start) * p
    return value.end + (value.start - value.end) * (1 + math.cos(math.pi * p)) / 2


def route(r: O.RouterSpec, logits, probs, num_experts: int, mods, tasks, rows, positions, bias=None):
    """Per-token list of (expert, weight) for the group's rows, by the router's plain definition."""
    E = num_experts
    T = len(rows)
    if r.kind == "deterministic":
        out = []
        for t in rows:
            if r.by == "modality":
                e = int(mods[t])
            elif r.by == "task":
                e = int(tasks[t])
            else:
                e = (((positions[t] % 2**32) * 2654435761) % 2**32 * E) >> 32  # the position in its sequence
            out.append([(e, torch.ones((), dtype=probs[0].dtype if probs else torch.float64))])
        return out
    if r.kind == "soft":
        return [[(e, p[e]) for e in range(E)] for p in probs]
    if r.kind == "dynamic_k":
        out = []
        for p in probs:
            order = sorted(range(E), key=lambda e: (-float(p[e].detach()), e))
            kept, total = [], 0.0
            for e in order:
                if total >= r.threshold and len(kept) >= r.k_min:
                    break
                kept.append(e)
                total += float(p[e].detach())
            kept = kept[:r.k]
            out.append([(e, p[e]) for e in kept])
        return out
    if r.kind == "expert_choice":
        picks = [[] for _ in range(T)]
        size = r.group_size or max(T, 1)
        for start in range(0, T, size):  # routing groups of consecutive tokens
            members = list(range(start, min(T, start + size)))
            cap = max(1, min(len(members), math.ceil(r.capacity * len(members) / E * (1 - 1e-9))))
            for e in range(E):
                for t in sorted(members, key=lambda t: -float(probs[t][e].detach()))[:cap]:
                    picks[t].append((e, probs[t][e]))
        return [sorted(p, key=lambda c: c[0]) for p in picks]
    if r.kind == "group_limited":
        out = []
        size = E // r.groups
        for p in probs:
            sel = [float(p[e].detach()) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
            gscore = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(r.groups)]
            kept = sorted(range(r.groups), key=lambda g: (-gscore[g], g))[:r.top_groups]
            cand = [e for e in range(E) if e // size in kept]
            top = sorted(cand, key=lambda e: (-sel[e], e))[:r.k]
            w = [p[e] for e in top]
            if r.renormalize:
                total = sum(w) + 1e-20
                w = [x / total for x in w]
            out.append([(e, x * r.scale) for e, x in zip(top, w)])
        return out
    # top_k
    out = []
    for p in probs:
        top = highest(p, r.k)
        w = p[top]
        if r.renormalize:
            w = w / (w.sum() + (1e-20 if r.score == "sigmoid" else 0.0))
        out.append([(e, w[j] * r.scale) for j, e in enumerate(top)])
    if r.capacity is not None:
        # Each expert keeps `cap` assignments: by position, slot-major (every token's first choice
        # before any second); by probability, the largest weights first (ties in position order).
        cap = max(1, math.ceil(r.capacity * T * r.k / E * (1 - 1e-9)))
        ranked = [(j, t) for j in range(r.k) for t in range(T)]
        if r.drop == "probability":
            ranked.sort(key=lambda jt: -float(out[jt[1]][jt[0]][1].detach()))  # stable: ties keep position order
        keep = set()
        taken = [0] * E
        for j, t in ranked:
            e = out[t][j][0]
            if taken[e] < cap:
                taken[e] += 1
                keep.add((j, t))
        out = [[out[t][j] for j in range(r.k) if (j, t) in keep] for t in range(T)]
    return out


def gru_cell(p: dict, prefix: str, x, h):
    """torch.nn.GRUCell's update for one token: x [input], h [hidden] (None: zeros); the weights
    stack the reset, update and new gates' rows in that order."""
    w_ir, w_iz, w_in = p[f"{prefix}.weight_ih"].chunk(3)
    w_hr, w_hz, w_hn = p[f"{prefix}.weight_hh"].chunk(3)
    b_ir, b_iz, b_in = p[f"{prefix}.bias_ih"].chunk(3)
    b_hr, b_hz, b_hn = p[f"{prefix}.bias_hh"].chunk(3)
    if h is None:
        h = torch.zeros(w_hr.shape[1], dtype=x.dtype)
    r = torch.sigmoid(w_ir @ x + b_ir + w_hr @ h + b_hr)
    z = torch.sigmoid(w_iz @ x + b_iz + w_hz @ h + b_hz)
    n = torch.tanh(w_in @ x + b_in + r * (w_hn @ h + b_hn))
    return (1 - z) * n + z * h


def router_state(p: dict, prefix: str, x, state):
    """RMoE: every token's state after this layer, GRU(P x_t, h_t) with P the layer's projection."""
    rows = x.reshape(-1, x.shape[-1])
    projected = [r @ p[f"{prefix}.router_projection.weight"].T for r in rows]
    return [gru_cell(p, "router_gru", u, None if state is None else state[t]) for t, u in enumerate(projected)]


def moe(op: O.MoEOp, p: dict, prefix: str, x, modality, task=None, step=0, router_input=None, positions=None):
    """A chain of `op.iterations` MoE passes, h_{c+1} = h_c + moe_c(h_c); returns the sum of the
    passes' outputs, their aux losses and the expert counts summed over the passes. A recurrent
    router's gates read `router_input` (one state row per token) instead of the tokens; hash
    routing keys on each token's position in its sequence (`positions`, one per flat row; by
    default the index along dim -2 of x)."""
    total, aux, counts = None, 0.0, None
    for it in range(op.iterations):
        y, a, c = moe_once(op, p, prefix, x if total is None else x + total, modality, task,
                           router=f"router_{it}" if it else "router", step=step, router_input=router_input,
                           positions=positions)
        total = y if total is None else total + y
        aux = aux + a
        counts = c if counts is None else counts + c
    return total, aux, counts


def moe_once(op: O.MoEOp, p: dict, prefix: str, x, modality, task=None, router="router", step=0,
             router_input=None, positions=None):
    flat, mods = x.reshape(-1, x.shape[-1]), modality.reshape(-1)
    seq = x.shape[-2] if x.dim() >= 2 else 1
    positions = positions if positions is not None else [t % seq for t in range(flat.shape[0])]
    tasks = task.reshape(-1) if task is not None else None
    y = torch.zeros_like(flat)
    aux = torch.zeros((), dtype=x.dtype)
    counts = []
    single = len(op.groups) == 1
    for g in op.groups:
        gp = prefix if single else f"{prefix}.{g.name}"
        r = g.router
        rows = [t for t in range(flat.shape[0]) if single or int(mods[t]) in g.modalities]
        count = torch.zeros(g.routed_experts, dtype=torch.long)
        logits_all, probs_all = [], []
        if r.learned:
            for t in rows:
                logits = (flat[t] if router_input is None else router_input[t]) @ p[f"{gp}.{router}.weight"].T
                logits_all.append(logits)
                t_ = temperature(r.temperature, step)
                probs_all.append(torch.softmax(logits / t_, -1) if r.score == "softmax" else torch.sigmoid(logits))
        bias = p.get(f"{gp}.{router}.score_bias")
        choices = route(r, logits_all, probs_all, g.routed_experts, mods, tasks, rows, positions, bias)
        for t, chosen in zip(rows, choices):
            for e, w in chosen:
                if e < g.num_experts:
                    y[t] = y[t] + w * expert(g.expert, p, f"{gp}.experts", e, flat[t])
                elif e < g.num_experts + g.num_identity:  # identity expert: the input itself
                    y[t] = y[t] + w * flat[t]
                count[e] += 1  # (a zero expert adds nothing)
            if g.shared is not None:
                y[t] = y[t] + dense_ffn(g.shared.widened(g.num_shared), p, f"{gp}.shared", flat[t])
        if rows and r.learned and op.losses.load_balance:
            f = count.to(x.dtype) / max(int(count.sum()), 1)
            P = torch.stack(probs_all).mean(0)
            aux = aux + op.losses.load_balance * g.routed_experts * (f * P).sum()
        if rows and r.learned and op.losses.z_loss:
            lse = torch.stack([torch.logsumexp(lg, -1) for lg in logits_all])
            aux = aux + op.losses.z_loss * (lse ** 2).mean()
        counts.append(count)
    if op.shared is not None:
        y = y + dense_ffn(op.shared.widened(op.num_shared), p, f"{prefix}.shared", flat)
    return y.reshape(x.shape), aux, torch.cat(counts)


def forward(spec, params: dict, x, modality, task=None, step=0):
    """Reference forward: (output, aux_loss, [expert counts per routed layer, its sublayers' counts
    concatenated in order])."""
    aux_total = torch.zeros((), dtype=x.dtype)
    all_counts = []
    state = None  # a recurrent router's per-token state, carried from MoE layer to MoE layer
    for i, block in enumerate(spec.layers):
        if block.depth is None:
            x, aux, counts, state = sublayers(spec, block, i, params, x, modality, task, step, state=state)
        else:
            x, aux, counts = depth_block(spec, block, i, params, x, modality, task, step)
        aux_total = aux_total + aux
        if counts:  # one tensor per layer: its sublayers' expert counts, in order
            all_counts.append(torch.cat(counts))
    if spec.final_norm is not None:
        x = norm(spec.final_norm, params, "final_norm", x)
    return x, aux_total, all_counts


def sublayers(spec, block, i: int, params: dict, x, modality, task, step, attend=None, state=None,
              positions=None):
    """The block's sublayers on x; `attend(op, prefix, h, names)` replaces whole-sequence attention;
    `state` is a recurrent router's state from the previous MoE layer. Returns (x, aux loss, expert
    counts per routed sublayer, state)."""
    aux_total = torch.zeros((), dtype=x.dtype)
    all_counts = []
    for sub in block.sublayers:
        pre = block.residual == "pre_norm"
        name = f"layers.{i}.{sub.op.name}"
        names = [spec.modalities[int(m)] for m in modality.reshape(-1)] if sub.norm.per_modality else None

        def norm_(v, sub=sub, names=names):
            return by_modality(lambda pre_, r: norm(sub.norm, params, pre_, r), f"layers.{i}.{sub.norm.name}", v, names)

        h = norm_(x) if pre else x
        if isinstance(sub.op, O.AttentionOp):
            out = attend(sub.op, name, h, names) if attend else attention(sub.op, params, name, h, names)
        elif isinstance(sub.op, O.AttentionExpertsOp):
            out, aux, counts = attention_experts(sub.op, params, name, h)
            aux_total = aux_total + aux
            all_counts.append(counts)
        elif isinstance(sub.op, O.FFNOp):
            out = by_modality(lambda pre_, r, sub=sub: dense_ffn(sub.op.expert, params, pre_, r), name, h, names)
        else:
            if sub.op.recurrent is not None:
                state = router_state(params, name, h, state)
            out, aux, counts = moe(sub.op, params, name, h, modality, task, step,
                                   state if sub.op.recurrent is not None else None, positions)
            aux_total = aux_total + aux
            all_counts.append(counts)
        x = x + out
        if not pre:
            x = norm_(x)
    return x, aux_total, all_counts, state


def depth_block(spec, block, i: int, params: dict, x, modality, task, step):
    """Mixture-of-Depths: per sequence, the ceil(ratio * n) best-scoring of its n candidate tokens
    (ties: earlier position) and every non-candidate token go through the block, in order; each
    attends only to the kept tokens of its sequence; a kept candidate's change is scaled by
    sigmoid / tanh of its score; skipped tokens keep x."""
    d = block.depth
    ratio = d.ratio_at(i, len(spec.layers))
    seq = x.shape[-2] if x.dim() >= 2 else 1
    xs = x.reshape(-1, seq, x.shape[-1])
    mods = modality.reshape(-1, seq)
    tasks = task.reshape(-1, seq) if task is not None else None
    w = params[f"layers.{i}.depth.router.weight"][0]
    kept, gates = [], []  # (sequence, position) in order, and the scale of each kept token's change
    for b in range(xs.shape[0]):
        scores = [xs[b, t] @ w for t in range(seq)]
        candidates = [t for t in range(seq) if not d.modalities or int(mods[b, t]) in d.modalities]
        quota = math.ceil(ratio * len(candidates) - 1e-9)
        chosen = sorted(candidates, key=lambda t: (-float(scores[t].detach()), t))[:quota]
        for t in range(seq):
            if t in chosen:
                kept.append((b, t))
                gates.append(torch.sigmoid(scores[t]) if d.weight == "sigmoid" else torch.tanh(scores[t]))
            elif t not in candidates:
                kept.append((b, t))
                gates.append(torch.ones((), dtype=x.dtype))
    rows = torch.stack([xs[b, t] for b, t in kept])
    row_mods = torch.stack([mods[b, t] for b, t in kept])
    row_tasks = torch.stack([tasks[b, t] for b, t in kept]) if tasks is not None else None

    def attend(op, prefix, h, names):  # each sequence's kept tokens attend among themselves
        out = torch.zeros_like(h)
        for b in range(xs.shape[0]):
            idx = [j for j, (bb, _) in enumerate(kept) if bb == b]
            if idx:
                sub_names = [names[j] for j in idx] if names is not None else None
                positions = [kept[j][1] for j in idx]  # rotary at the original positions
                out[idx] = attention(op, params, prefix, h[idx].unsqueeze(0), sub_names, positions)[0]
        return out

    y, aux, counts, _ = sublayers(spec, block, i, params, rows, row_mods, row_tasks, step, attend,
                                  positions=[t for _, t in kept])
    out = xs.clone()
    for j, (b, t) in enumerate(kept):
        out[b, t] = xs[b, t] + gates[j] * (y[j] - xs[b, t])
    return out.reshape(x.shape), aux, counts
