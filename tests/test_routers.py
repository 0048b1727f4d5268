"""Tests for backends/pytorch/routers.py.

Every router is compared with an independent fp64 reference written here with explicit Python
loops over tokens / experts (selection with Python ``sorted`` on floats, never torch.topk/sort);
outputs and the gradients of the weights w.r.t. the logits must match.  Random logits have no
ties, so the references need no tie rule; tie behaviour is tested separately (set sizes, and the
documented stable lowest-id-first rule where the router promises one).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from moec.backends.pytorch import routers as R
from moec.backends.pytorch.runtime import moe_experts
from torch.utils._python_dispatch import TorchDispatchMode

# --------------------------------------------------------------------------- reference helpers


def _logits(T, E, seed, dtype=torch.float64, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ref_scores_row(row, score):
    if score == "softmax":
        e = torch.exp(row - row.max().detach())
        return e / e.sum()
    return 1.0 / (1.0 + torch.exp(-row))


def _ref_ceil(x):
    return math.ceil(round(x, 9))


def _assemble(rows_w, rows_ids, K, like):
    """Stack per-token lists of scalar weights / ints into [T, K] tensors."""
    if not rows_w:
        return like.new_zeros(0, K), torch.zeros(0, K, dtype=torch.long)
    zero = like.sum() * 0  # a zero that stays in the autograd graph
    w = torch.stack([torch.stack([v if v is not None else zero for v in r]) for r in rows_w])
    return w, torch.tensor(rows_ids, dtype=torch.long).view(-1, K)


def ref_expert_choice(logits, cf, score="softmax", group_size=None):
    T, E = logits.shape
    probs = [_ref_scores_row(logits[t], score) for t in range(T)]
    rows_w = [[None] * E for _ in range(T)]
    rows_ids = [[-1] * E for _ in range(T)]
    G = T if group_size is None else group_size
    for start in range(0, T, max(G, 1)):
        toks = list(range(start, min(start + G, T)))
        n = len(toks)
        C = min(max(_ref_ceil(cf * n / E), 1), n)
        for e in range(E):
            ranked = sorted(toks, key=lambda t, e=e: -float(probs[t][e].detach()))
            for t in ranked[:C]:
                rows_w[t][e] = probs[t][e]
                rows_ids[t][e] = e
    return _assemble(rows_w, rows_ids, E, logits)


def ref_dynamic_k(logits, threshold, k_min=1, k_max=None, score="softmax", renormalize=False):
    T, E = logits.shape
    K = E if k_max is None else k_max
    rows_w, rows_ids = [], []
    for t in range(T):
        p = _ref_scores_row(logits[t], score)
        order = sorted(range(E), key=lambda e: -float(p[e].detach()))  # Python sort is stable
        n, running = 0, 0.0
        for e in order:
            if running >= threshold:
                break
            running += float(p[e].detach())
            n += 1
        n = min(max(n, k_min), K)
        chosen = order[:n]
        ws = [p[e] for e in chosen]
        if renormalize and ws:
            s = sum(ws)
            ws = [v / s for v in ws]
        rows_w.append(ws + [None] * (K - n))
        rows_ids.append(chosen + [-1] * (K - n))
    return _assemble(rows_w, rows_ids, K, logits)


def ref_hash(key, E):
    h = ((key % 2**32) * 2654435761) % 2**32
    return (h * E) >> 32


def ref_group_limited(logits, k, num_groups, topk_groups, bias, scale, renormalize, score):
    T, E = logits.shape
    gs = E // num_groups
    rows_w, rows_ids = [], []
    for t in range(T):
        s = _ref_scores_row(logits[t], score)
        sel = [float(s[e].detach()) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        gscore = []
        for g in range(num_groups):
            vals = sorted(sel[g * gs:(g + 1) * gs], reverse=True)
            gscore.append(sum(vals[:2]))
        groups = sorted(range(num_groups), key=lambda g: -gscore[g])[:topk_groups]
        cands = [e for e in range(E) if e // gs in groups]
        chosen = sorted(cands, key=lambda e: -sel[e])[:k]
        ws = [s[e] for e in chosen]
        if renormalize:
            tot = sum(ws) + 1e-20
            ws = [v / tot for v in ws]
        rows_w.append([v * scale for v in ws])
        rows_ids.append(chosen)
    return _assemble(rows_w, rows_ids, k, logits)


def ref_top_k_temperature(logits, k, temperature, renormalize=False):
    T, E = logits.shape
    rows_w, rows_ids = [], []
    for t in range(T):
        p = _ref_scores_row(logits[t] / temperature, "softmax")
        chosen = sorted(range(E), key=lambda e: -float(p[e].detach()))[:k]
        ws = [p[e] for e in chosen]
        if renormalize:
            tot = sum(ws)
            ws = [v / tot for v in ws]
        rows_w.append(ws)
        rows_ids.append(chosen)
    return _assemble(rows_w, rows_ids, k, logits)


def ref_apply_capacity(weights, ids, E, cf, policy):
    T, K = ids.shape
    C = _ref_ceil(cf * T * K / E)
    pairs = [(j, t) for j in range(K) for t in range(T)]  # slot-major, then token order
    if policy == "probability":
        pairs = sorted(pairs, key=lambda p: -float(weights[p[1], p[0]].detach()))  # stable: ties by position
    used = [0] * E
    keep = [[False] * K for _ in range(T)]
    for j, t in pairs:
        e = int(ids[t, j])
        if e < 0:
            continue
        if used[e] < C:
            used[e] += 1
            keep[t][j] = True
    keep_t = torch.tensor(keep, dtype=torch.bool).view(T, K)
    new_w = torch.where(keep_t, weights, torch.zeros_like(weights))
    new_ids = torch.where(keep_t, ids, torch.full_like(ids, -1))
    dropped = int(((ids >= 0) & ~keep_t).sum())
    return new_w, new_ids, dropped


def _check_against_ref(fn, ref, logits, *args, **kwargs):
    """Outputs equal, weights' gradient w.r.t. logits equal (random cotangent)."""
    a = logits.detach().clone().requires_grad_()
    b = logits.detach().clone().requires_grad_()
    w, ids, probs = fn(a, *args, **kwargs)
    rw, rids = ref(b, *args, **kwargs)
    assert ids.dtype == torch.long
    assert w.dtype == torch.promote_types(logits.dtype, torch.float32) == probs.dtype
    assert w.shape == rw.shape and ids.shape == rids.shape
    assert torch.equal(ids, rids), (ids, rids)
    torch.testing.assert_close(w.double(), rw.double(), rtol=1e-6, atol=1e-9)
    assert torch.all(w[ids < 0] == 0)
    if w.numel() and w.requires_grad:
        cot = torch.randn(w.shape, generator=torch.Generator().manual_seed(99), dtype=w.dtype)
        (w * cot).sum().backward()
        (rw * cot.to(rw.dtype)).sum().backward()
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=1e-6, atol=1e-9)
    return w, ids, probs


# --------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize(
    "T,E,cf,group_size,score",
    [
        (12, 4, 1.0, None, "softmax"),
        (10, 4, 1.0, 4, "softmax"),  # groups of 4, 4, 2
        (11, 3, 2.0, 5, "sigmoid"),  # groups of 5, 5, 1
        (13, 2, 1.0, 8, "softmax"),  # groups of 8 (C=4) and 5 (C=3)
        (9, 5, 0.1, None, "softmax"),  # capacity < needed: C clamps to 1
        (6, 3, 10.0, 4, "softmax"),  # capacity > group: every expert picks every token
        (1, 4, 1.0, None, "softmax"),
        (7, 1, 1.0, 3, "softmax"),
        (8, 4, 1.0, 100, "softmax"),  # group_size > T
    ],
)
def test_expert_choice_matches_reference(T, E, cf, group_size, score):
    logits = _logits(T, E, seed=T * 31 + E)
    w, ids, _probs = _check_against_ref(
        R.route_expert_choice, ref_expert_choice, logits, cf, score=score, group_size=group_size
    )
    assert w.shape == (T, E)
    valid = ids >= 0
    assert torch.equal(ids[valid], torch.arange(E).expand(T, E)[valid])  # slot e holds expert e


def test_expert_choice_large_capacity_is_soft():
    logits = _logits(6, 3, seed=1)
    w, ids, _probs = R.route_expert_choice(logits, 10.0)
    sw, sids, _ = R.route_soft(logits)
    assert torch.equal(ids, sids)
    torch.testing.assert_close(w, sw)


def test_expert_choice_ties_and_fp32():
    T, E, cf = 10, 4, 1.0
    for group_size in (None, 4):
        w, ids, probs = R.route_expert_choice(torch.zeros(T, E), cf, group_size=group_size)
        assert w.dtype == torch.float32 and probs.dtype == torch.float32
        G = T if group_size is None else group_size
        for start in range(0, T, G):
            n = min(G, T - start)
            C = min(max(math.ceil(cf * n / E), 1), n)
            picked_per_expert = (ids[start:start + n] >= 0).sum(0)
            assert picked_per_expert.tolist() == [C] * E  # torch.topk: exactly C tokens per expert
    w, ids, probs = R.route_expert_choice(_logits(5, 3, 2, dtype=torch.bfloat16), 1.0)
    assert w.dtype == torch.float32


def test_expert_choice_empty_and_errors():
    w, ids, probs = R.route_expert_choice(torch.zeros(0, 4), 1.0, group_size=3)
    assert w.shape == ids.shape == probs.shape == (0, 4)
    with pytest.raises(ValueError, match="capacity_factor"):
        R.route_expert_choice(torch.zeros(3, 4), 0.0)
    with pytest.raises(ValueError, match="group_size"):
        R.route_expert_choice(torch.zeros(3, 4), 1.0, group_size=0)
    with pytest.raises(ValueError, match="score"):
        R.route_expert_choice(torch.zeros(3, 4), 1.0, score="relu")
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        R.route_expert_choice(torch.zeros(3), 1.0)


def test_expert_choice_capacity_rounding():
    # 1.1 * 30 / 3 is 11.000000000000002 in floating point: the capacity must be 11, not 12.
    assert R.capacity(1.1, 30, 3) == 11
    _w, ids, _ = R.route_expert_choice(_logits(30, 3, 5), 1.1)
    assert (ids >= 0).sum(0).tolist() == [11, 11, 11]


# --------------------------------------------------------------------------- dynamic k


@pytest.mark.parametrize(
    "T,E,threshold,k_min,k_max,score,renorm",
    [
        (16, 6, 0.6, 1, None, "softmax", False),
        (16, 6, 0.9, 1, 3, "softmax", True),  # k_max clamps
        (16, 6, 0.3, 2, 4, "softmax", False),  # k_min clamps
        (16, 6, 0.0, 1, None, "softmax", False),  # threshold 0 -> k_min experts
        (16, 6, 0.0, 0, None, "softmax", True),  # nothing kept at all
        (16, 6, 1.0, 1, None, "softmax", False),  # threshold 1 -> (almost) all
        (16, 6, 0.8, 1, None, "sigmoid", False),
        (1, 4, 0.5, 1, None, "softmax", False),
        (5, 1, 0.5, 1, None, "softmax", False),
    ],
)
def test_dynamic_k_matches_reference(T, E, threshold, k_min, k_max, score, renorm):
    logits = _logits(T, E, seed=T + 7 * E)
    w, ids, _probs = _check_against_ref(
        R.route_dynamic_k, ref_dynamic_k, logits, threshold, k_min, k_max, score=score, renormalize=renorm
    )
    K = E if k_max is None else k_max
    n = (ids >= 0).sum(1)
    assert w.shape == (T, K)
    assert torch.all(n >= min(k_min, K)) and torch.all(n <= K)
    if threshold == 0.0:
        assert torch.all(n == k_min)


def test_dynamic_k_threshold_one_keeps_all():
    logits = _logits(8, 5, 3)
    _w, ids, _ = R.route_dynamic_k(logits, 1.0)
    assert torch.all(ids >= 0)


def test_dynamic_k_ties_lowest_id_first():
    # All-equal logits: the stable sort keeps the lower expert id first; 0.25 + 0.25 reaches 0.5.
    w, ids, _ = R.route_dynamic_k(torch.zeros(3, 4), 0.5)
    assert ids.tolist() == [[0, 1, -1, -1]] * 3
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.25, 0.0, 0.0]] * 3))
    w, ids, _probs = R.route_dynamic_k(torch.zeros(2, 4, dtype=torch.float64), 0.5, renormalize=True)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 2, dtype=torch.float64))


def test_dynamic_k_exported_matches_eager_with_ties():
    """Under torch.export the sort becomes comparisons (no dialect lowers a stable sort): the same
    routing, ties in expert-id order included, gradients too."""

    class DynamicK(torch.nn.Module):
        def forward(self, logits):
            return R.route_dynamic_k(logits, 0.6, k_min=1, k_max=4)

    logits = _logits(12, 6, 5)
    logits[0] = 0.0  # six-way tie
    logits[1, 1] = logits[1, 4]  # a tie between two experts
    logits[2, :3] = 2.0
    exported = torch.export.export(DynamicK(), (logits,))
    assert not any("sort" in str(n.target) for n in exported.graph.nodes)
    eager = R.route_dynamic_k(logits, 0.6, k_min=1, k_max=4)
    for a, b in zip(eager, exported.module()(logits)):
        assert torch.equal(a, b)
    assert eager[1][0].tolist() == [0, 1, 2, 3]


def test_dynamic_k_empty_and_errors():
    w, ids, probs = R.route_dynamic_k(torch.zeros(0, 5), 0.5, k_max=3)
    assert w.shape == ids.shape == (0, 3) and probs.shape == (0, 5)
    for kwargs in ({"k_min": 4, "k_max": 3}, {"k_max": 6}, {"k_min": -1}):
        with pytest.raises(ValueError, match="k_min"):
            R.route_dynamic_k(torch.zeros(2, 5), 0.5, **kwargs)
    with pytest.raises(ValueError, match="threshold"):
        R.route_dynamic_k(torch.zeros(2, 5), 1.5)


# --------------------------------------------------------------------------- deterministic


def test_deterministic_modality_and_task():
    modality = torch.tensor([0, 2, 1, 2, 0])
    w, ids, probs = R.route_deterministic(5, 3, by="modality", modality=modality)
    assert ids.tolist() == [[m] for m in modality.tolist()]
    assert w.tolist() == [[1.0]] * 5 and w.dtype == torch.float32
    for t, m in enumerate(modality.tolist()):
        assert probs[t].tolist() == [1.0 if e == m else 0.0 for e in range(3)]
    w, ids, probs = R.route_deterministic(4, 6, by="task", task=5)
    assert ids.tolist() == [[5]] * 4 and probs[:, 5].tolist() == [1.0] * 4
    w, ids, _ = R.route_deterministic(3, 6, by="task", task=torch.tensor(2))
    assert ids.tolist() == [[2]] * 3
    w, ids, probs = R.route_deterministic(0, 3, by="modality", modality=torch.zeros(0, dtype=torch.long))
    assert w.shape == ids.shape == (0, 1) and probs.shape == (0, 3)
    w, ids, _ = R.route_deterministic(2, 1, by="task", task=torch.tensor([0, 0]))
    assert ids.tolist() == [[0], [0]]


def test_deterministic_errors():
    with pytest.raises(ValueError, match=r"modality ids must lie in \[0, 2\)"):
        R.route_deterministic(3, 2, by="modality", modality=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="must lie in"):
        R.route_deterministic(3, 2, by="task", task=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="out of range"):
        R.route_deterministic(3, 2, by="task", task=2)
    with pytest.raises(ValueError, match="needs `modality`"):
        R.route_deterministic(3, 2, by="modality")
    with pytest.raises(ValueError, match="shape"):
        R.route_deterministic(3, 2, by="modality", modality=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        R.route_deterministic(2, 2, by="modality", modality=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown by"):
        R.route_deterministic(3, 2, by="random")
    # validate=False skips the (host-syncing) range check
    R.route_deterministic(2, 2, by="modality", modality=torch.tensor([0, 1]), validate=False)


def test_deterministic_hash_matches_reference_and_is_uniform():
    E = 8
    keys = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**32 + 5, 2**40 + 3, -1, -(2**35) + 17, 2**62])
    _w, ids, probs = R.route_deterministic(len(keys), E, by="hash", token_ids=keys)
    assert ids.view(-1).tolist() == [ref_hash(int(k), E) for k in keys]
    assert torch.all(probs.sum(1) == 1)
    # positions (default arange(T)) and token ids; 10k ids spread roughly uniformly
    for E in (8, 7, 64):
        for kwargs in (
            {},
            {"token_ids": torch.randint(0, 50_000, (10_000,), generator=torch.Generator().manual_seed(0))},
        ):
            _, ids, _ = R.route_deterministic(10_000, E, by="hash", **kwargs)
            counts = torch.bincount(ids.view(-1), minlength=E).double()
            assert counts.shape == (E,) and ids.min() >= 0 and ids.max() < E
            expected = 10_000 / E
            chi2 = float(((counts - expected) ** 2 / expected).sum())
            assert chi2 < 3 * E, (E, counts.tolist())  # chi-square with E-1 dof: mean E-1
    _, by_pos, _ = R.route_deterministic(5, 8, by="hash", positions=torch.arange(5) + 100)
    assert by_pos.view(-1).tolist() == [ref_hash(100 + i, 8) for i in range(5)]
    _, default, _ = R.route_deterministic(5, 8, by="hash")
    assert default.view(-1).tolist() == [ref_hash(i, 8) for i in range(5)]


# --------------------------------------------------------------------------- soft


@pytest.mark.parametrize("T,E,score", [(6, 4, "softmax"), (6, 4, "sigmoid"), (1, 1, "softmax"), (0, 3, "softmax")])
def test_soft(T, E, score):
    def ref(logits, score):
        rows = [list(_ref_scores_row(logits[t], score)) for t in range(T)]
        return _assemble(rows, [list(range(E))] * T, E, logits)

    _check_against_ref(R.route_soft, ref, _logits(T, E, 4), score)


# --------------------------------------------------------------------------- group limited


@pytest.mark.parametrize(
    "T,E,k,G,TG,use_bias,scale,renorm,score",
    [
        (12, 8, 2, 4, 2, True, 2.5, True, "sigmoid"),
        (12, 8, 3, 4, 1, True, 1.0, False, "sigmoid"),  # k=3 > 1 group * 2 experts: ValueError
        (12, 16, 4, 4, 2, False, 1.0, True, "softmax"),
        (12, 6, 2, 6, 3, True, 1.0, True, "sigmoid"),  # groups of one expert: group score = its value
        (1, 4, 1, 1, 1, True, 1.0, True, "sigmoid"),
        (5, 1, 1, 1, 1, False, 1.0, False, "sigmoid"),
        (0, 8, 2, 4, 2, True, 1.0, True, "sigmoid"),
    ],
)
def test_group_limited_matches_reference(T, E, k, G, TG, use_bias, scale, renorm, score):
    bias = torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.3 if use_bias else None
    logits = _logits(T, E, seed=11 + T)
    if k > TG * (E // G):
        with pytest.raises(ValueError, match="topk_groups"):
            R.route_group_limited(logits, k, G, TG, bias)
        return
    _w, ids, _probs = _check_against_ref(
        R.route_group_limited, ref_group_limited, logits, k, G, TG, bias, scale, renorm, score
    )
    if T:
        groups_used = (ids // (E // G)).unique(dim=None)
        assert all(len(set((ids[t] // (E // G)).tolist())) <= TG for t in range(T))
        assert groups_used.numel() >= 1


def test_group_limited_negative_bias_never_picks_masked_group():
    # Large negative biases make every selection score negative: masking with 0.0 (as
    # transformers does) would pick experts of dropped groups; -inf masking must not.
    E, G = 8, 4
    logits = _logits(20, E, 6)
    bias = torch.full((E,), -5.0)
    _w, ids, _ = R.route_group_limited(logits, 2, G, 1, bias)
    gs = E // G
    for t in range(20):
        assert len(set((ids[t] // gs).tolist())) == 1
    _check_against_ref(R.route_group_limited, ref_group_limited, logits, 2, G, 1, bias, 1.0, True, "sigmoid")


def test_group_limited_bias_steers_selection_not_weights():
    logits = torch.zeros(3, 4)
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])
    w, ids, _probs = R.route_group_limited(logits, 1, 1, 1, bias, renormalize=False)
    assert ids.view(-1).tolist() == [3, 3, 3]
    torch.testing.assert_close(w, torch.full((3, 1), 0.5))  # sigmoid(0), bias not included


def test_group_limited_ties_and_errors():
    E, G, TG, k = 8, 4, 2, 3
    w, ids, _ = R.route_group_limited(torch.zeros(5, E), k, G, TG, None)
    assert ids.tolist() == [[0, 1, 2]] * 5  # tied groups and experts: the lower ids
    torch.testing.assert_close(w, torch.full((5, k), 1.0 / k))
    with pytest.raises(ValueError, match="dividing the number of experts E=8"):
        R.route_group_limited(torch.zeros(2, 8), 2, 3, 1, None)
    with pytest.raises(ValueError, match="num_groups"):
        R.route_group_limited(torch.zeros(2, 8), 2, 0, 1, None)
    with pytest.raises(ValueError, match="topk_groups"):
        R.route_group_limited(torch.zeros(2, 8), 2, 4, 5, None)
    with pytest.raises(ValueError, match="k=5"):
        R.route_group_limited(torch.zeros(2, 8), 5, 4, 2, None)
    with pytest.raises(ValueError, match="bias"):
        R.route_group_limited(torch.zeros(2, 8), 2, 4, 2, torch.zeros(7))


def test_update_balance_bias():
    bias = torch.nn.Parameter(torch.zeros(4))
    out = R.update_balance_bias(bias, torch.tensor([6, 2, 4, 4]), 0.1)
    assert out is bias
    torch.testing.assert_close(bias.detach(), torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert bias.grad is None
    # Closed loop: a skewed router becomes balanced by the bias alone.
    E, T, k = 8, 256, 2
    logits = _logits(T, E, 7, dtype=torch.float32, scale=0.5) + torch.linspace(1.5, -1.5, E)
    bias = torch.zeros(E)

    def imbalance():
        _, ids, _ = R.route_group_limited(logits, k, 1, 1, bias)
        counts = torch.bincount(ids.view(-1), minlength=E)
        return counts, float(counts.max()) / (T * k / E)

    counts, before = imbalance()
    for _ in range(300):
        R.update_balance_bias(bias, counts, 0.01)
        counts, _ = imbalance()
    _, after = imbalance()
    assert before > 2.5 and after < 1.4, (before, after)
    with pytest.raises(ValueError):
        R.update_balance_bias(torch.zeros(4), torch.zeros(3), 0.1)


# --------------------------------------------------------------------------- capacity


def _topk_routing(T, E, k, seed):
    logits = _logits(T, E, seed).requires_grad_()
    probs = torch.softmax(logits, -1)
    ids = torch.topk(probs.detach(), k, -1).indices
    return probs.gather(1, ids), ids, logits


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize(
    "T,E,k,cf",
    [(16, 4, 2, 1.0), (16, 4, 2, 0.5), (16, 4, 2, 100.0), (9, 3, 1, 0.25), (1, 4, 2, 1.0), (5, 1, 1, 0.5)],
)
def test_apply_capacity_matches_reference(T, E, k, cf, policy):
    w, ids, logits = _topk_routing(T, E, k, seed=T + E + k)
    ids = ids.clone()
    if T > 2 and k > 1:
        ids[1, 1] = -1  # pre-dropped slots are ignored
    nw, nids, dropped = R.apply_capacity(w, ids, E, cf, policy)
    rw, rids, rdropped = ref_apply_capacity(w, ids, E, cf, policy)
    assert torch.equal(nids, rids)
    torch.testing.assert_close(nw, rw, rtol=0, atol=0)
    assert dropped.dtype == torch.long and dropped.dim() == 0 and int(dropped) == rdropped
    C = math.ceil(cf * T * k / E)
    counts = torch.bincount(nids[nids >= 0], minlength=E)
    assert torch.all(counts <= C)
    if cf >= 100:
        assert int(dropped) == 0 and torch.equal(nids, ids)
    # gradient flows to the kept weights only
    cot = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=w.dtype)
    (g_kept,) = torch.autograd.grad((nw * cot).sum(), logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad((rw * cot).sum(), logits)
    torch.testing.assert_close(g_kept, g_ref)


def test_apply_capacity_priorities():
    # Expert 0 wanted by 4 slots, capacity 2 (cf=1: 4 tokens * 2 slots / 4 experts).
    ids = torch.tensor([[1, 0], [0, 2], [3, 0], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.1, 0.9], [0.7, 0.3]])
    _, pos_ids, d1 = R.apply_capacity(w, ids, 4, 1.0, "position")
    # slot-0 assignments first (tokens 1 and 3), so token 0's and token 2's slot-1 choices drop
    assert pos_ids.tolist() == [[1, -1], [0, 2], [3, -1], [0, 1]] and int(d1) == 2
    _, prob_ids, d2 = R.apply_capacity(w, ids, 4, 1.0, "probability")
    # expert 0's weights: 0.4 (t0), 0.5 (t1), 0.9 (t2), 0.7 (t3) -> keeps t2 and t3
    assert prob_ids.tolist() == [[1, -1], [-1, 2], [3, 0], [0, 1]] and int(d2) == 2
    # equal weights: "probability" falls back to the "position" order
    _, tie_ids, _ = R.apply_capacity(torch.ones(4, 2), ids, 4, 1.0, "probability")
    assert torch.equal(tie_ids, pos_ids)


def test_apply_capacity_empty_and_errors():
    nw, nids, dropped = R.apply_capacity(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), 4, 1.0)
    assert nw.shape == nids.shape == (0, 2) and int(dropped) == 0
    with pytest.raises(ValueError, match="policy"):
        R.apply_capacity(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long), 4, 1.0, "random")
    with pytest.raises(ValueError, match="capacity_factor"):
        R.apply_capacity(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long), 4, 0.0)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        R.apply_capacity(torch.zeros(2, 2), torch.zeros(2, 1, dtype=torch.long), 4, 1.0)


# --------------------------------------------------------------------------- jitter, schedules, temperature


def test_router_jitter():
    x = torch.randn(50, 8)
    assert R.router_jitter(x, 0.1, training=False) is x
    assert R.router_jitter(x, 0.0, training=True) is x
    y = R.router_jitter(x, 0.1, training=True, generator=torch.Generator().manual_seed(1))
    ratio = y / x
    assert torch.all(ratio >= 0.9 - 1e-6) and torch.all(ratio <= 1.1 + 1e-6)
    assert ratio.std() > 0.02
    y2 = R.router_jitter(x, 0.1, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    xb = x.to(torch.bfloat16).requires_grad_()
    yb = R.router_jitter(xb, 0.1, training=True)
    assert yb.dtype == torch.bfloat16
    yb.sum().backward()
    assert xb.grad is not None
    with pytest.raises(ValueError):
        R.router_jitter(x, -0.1, training=True)


def test_schedule_value():
    assert R.schedule_value("constant", 7, 10, 2.0, 0.5) == 2.0
    assert R.schedule_value("linear", 0, 10, 2.0, 0.5) == 2.0
    assert R.schedule_value("linear", 5, 10, 2.0, 0.5) == pytest.approx(1.25)
    assert R.schedule_value("linear", 10, 10, 2.0, 0.5) == pytest.approx(0.5)
    assert R.schedule_value("linear", 50, 10, 2.0, 0.5) == pytest.approx(0.5)
    assert R.schedule_value("linear", -3, 10, 2.0, 0.5) == 2.0
    assert R.schedule_value("cosine", 0, 10, 2.0, 0.5) == pytest.approx(2.0)
    assert R.schedule_value("cosine", 5, 10, 2.0, 0.5) == pytest.approx(1.25)
    assert R.schedule_value("cosine", 2, 10, 2.0, 0.5) == pytest.approx(0.5 + 1.5 * (1 + math.cos(0.2 * math.pi)) / 2)
    assert R.schedule_value("cosine", 10, 10, 2.0, 0.5) == pytest.approx(0.5)
    assert R.schedule_value("cosine", 99, 10, 2.0, 0.5) == pytest.approx(0.5)
    assert R.schedule_value("cosine", 0, 0, 2.0, 0.5) == pytest.approx(0.5)
    vals = [R.schedule_value("cosine", s, 20, 1.0, 0.0) for s in range(21)]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    assert isinstance(R.schedule_value("linear", 1, 3, 1, 0), float)
    with pytest.raises(ValueError, match="kind"):
        R.schedule_value("exp", 0, 10, 1.0, 0.0)


@pytest.mark.parametrize(
    "T,E,k,temp,renorm",
    [(10, 6, 2, 1.0, False), (10, 6, 3, 0.3, True), (10, 6, 6, 5.0, False), (1, 1, 1, 2.0, True), (0, 4, 2, 1.0, False)],
)
def test_top_k_temperature(T, E, k, temp, renorm):
    _check_against_ref(R.route_top_k_temperature, ref_top_k_temperature, _logits(T, E, 8 + T), k, temp, renorm)


def test_top_k_temperature_limits_and_errors():
    from moec.backends.pytorch.runtime import route_top_k

    logits = _logits(8, 5, 9, dtype=torch.float32)
    a, b = R.route_top_k_temperature(logits, 2, 1.0), route_top_k(logits, 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    _, _, hot = R.route_top_k_temperature(logits, 2, 1e4)
    torch.testing.assert_close(hot, torch.full_like(hot, 0.2), atol=1e-3, rtol=0)
    _w, ids, _ = R.route_top_k_temperature(torch.zeros(3, 6), 4, 0.5)
    assert all(len(set(r)) == 4 for r in ids.tolist())
    with pytest.raises(ValueError, match="temperature"):
        R.route_top_k_temperature(logits, 2, 0.0)
    with pytest.raises(ValueError, match="k=6"):
        R.route_top_k_temperature(logits, 6, 1.0)


# --------------------------------------------------------------------------- no loops, no syncs


def _all_routings(T, E=6, seed=0, logits=None):
    """(name, (weights, ids, probs), logits) for every router on one set of logits."""
    logits = _logits(T, E, seed, dtype=torch.float32) if logits is None else logits
    out = {}
    out["expert_choice"] = R.route_expert_choice(logits, 1.0, group_size=5)
    out["dynamic_k"] = R.route_dynamic_k(logits, 0.7, k_max=4)
    out["soft"] = R.route_soft(logits)
    out["group_limited"] = R.route_group_limited(logits, 2, 3, 2, torch.linspace(-0.1, 0.1, E), scale=1.5)
    out["temperature"] = R.route_top_k_temperature(logits, 2, 0.7)
    w, ids, p = R.route_top_k_temperature(logits, 3, 1.0)
    out["capacity_position"] = (*R.apply_capacity(w, ids, E, 0.6, "position")[:2], p)
    out["capacity_probability"] = (*R.apply_capacity(w, ids, E, 0.6, "probability")[:2], p)
    out["hash"] = R.route_deterministic(T, E, by="hash")
    out["modality"] = R.route_deterministic(T, E, by="modality", modality=torch.arange(T) % 3)
    return out


class _Recorder(TorchDispatchMode):
    DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_unique", "bincount", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name.startswith(self.DATA_DEPENDENT):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _run_router(name, T, E=6):
    logits = _logits(T, E, 1, dtype=torch.float32).requires_grad_()
    routing = _all_routings(T, E, logits=logits)[name]
    if routing[0].requires_grad:
        routing[0].sum().backward()


ROUTER_NAMES = list(_all_routings(4).keys())


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_no_python_loop_over_tokens(name):
    counts = []
    for T in (15, 60):
        with _Recorder() as rec:
            _run_router(name, T)
        counts.append(rec.ops)
    assert counts[0] == counts[1]


def test_host_syncs(monkeypatch):
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"]
    calls = []
    for n in names:
        original = getattr(torch.Tensor, n)

        def wrapper(self, *a, _orig=original, _n=n, **kw):
            calls.append(_n)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, n, wrapper)

    def count(fn):
        calls.clear()
        with _Recorder() as rec:
            fn()
        return max(len(calls), len(rec.syncs))

    lg = _logits(12, 6, 2, dtype=torch.float32)
    w, ids, _ = R.route_top_k_temperature(lg, 2, 1.0)
    measured = {
        "route_expert_choice": count(lambda: R.route_expert_choice(lg, 1.0, group_size=5)),
        "route_dynamic_k": count(lambda: R.route_dynamic_k(lg, 0.7, k_max=4)),
        "route_soft": count(lambda: R.route_soft(lg)),
        "route_group_limited": count(lambda: R.route_group_limited(lg, 2, 3, 2, torch.zeros(6))),
        "update_balance_bias": count(lambda: R.update_balance_bias(torch.zeros(6), torch.arange(6), 0.1)),
        "apply_capacity": count(lambda: R.apply_capacity(w, ids, 6, 0.5, "probability")),
        "router_jitter": count(lambda: R.router_jitter(lg, 0.1, True)),
        "schedule_value": count(lambda: R.schedule_value("cosine", 3, 10, 1.0, 0.0)),
        "route_top_k_temperature": count(lambda: R.route_top_k_temperature(lg, 2, 0.5)),
        "route_deterministic": count(
            lambda: R.route_deterministic(12, 6, by="modality", modality=torch.arange(12) % 6)
        ),
    }
    assert measured == R.ROUTER_HOST_SYNCS
    modality = torch.arange(12) % 6
    assert count(lambda: R.route_deterministic(12, 6, by="hash", token_ids=modality)) == 0
    assert count(lambda: R.route_deterministic(12, 6, by="modality", modality=modality, validate=False)) == 0
    assert count(lambda: R.route_deterministic(12, 6, by="task", task=3)) == 0


# --------------------------------------------------------------------------- end to end with moe_experts


def _ref_moe(x, ids, w, up, down, gate):
    T, d = x.shape
    out = torch.zeros(T, d, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            xt = x[t].double()
            h = torch.nn.functional.silu(xt @ gate[e].double()) * (xt @ up[e].double())
            out[t] += w[t, j].double() * (h @ down[e].double())
    return out


@pytest.mark.parametrize("method", ["split", "grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("T", [0, 1, 13])
def test_routings_feed_moe_experts(method, T):
    E, d, f = 6, 8, 12
    g = torch.Generator().manual_seed(40 + T)
    x = torch.randn(T, d, generator=g)
    up, gate = torch.randn(E, d, f, generator=g) * 0.3, torch.randn(E, d, f, generator=g) * 0.3
    down = torch.randn(E, f, d, generator=g) * 0.3
    for name, (w, ids, probs) in _all_routings(T, E, seed=T).items():
        assert w.shape == ids.shape and ids.dtype == torch.long and probs.shape == (T, E), name
        assert torch.all((ids >= -1) & (ids < E)) and torch.all(w[ids < 0] == 0), name
        y = moe_experts(x, ids, w, up, down, gate, method=method)
        ref = _ref_moe(x, ids, w.detach(), up, down, gate)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5, msg=name)


def test_moe_experts_gradient_through_routers():
    """d(output)/d(logits) through moe_experts equals the per-token loop reference's."""
    T, E, d, f = 9, 6, 8, 8
    g = torch.Generator().manual_seed(41)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    up, gate = torch.randn(E, d, f, generator=g, dtype=torch.float64), torch.randn(E, d, f, generator=g, dtype=torch.float64)
    down = torch.randn(E, f, d, generator=g, dtype=torch.float64)
    cot = torch.randn(T, d, generator=g, dtype=torch.float64)
    base = _logits(T, E, 42)
    for name in ROUTER_NAMES:
        if name in ("hash", "modality"):
            continue
        grads = []
        for use_ref in (False, True):
            logits = base.clone().requires_grad_()
            w, ids, _ = _all_routings(T, E, logits=logits)[name]
            y = _ref_moe(x, ids, w, up, down, gate) if use_ref else moe_experts(
                x, ids, w, up, down, gate, method="split"
            )
            (grad,) = torch.autograd.grad((y * cot).sum(), logits)
            grads.append(grad)
        torch.testing.assert_close(grads[0], grads[1], msg=name)
