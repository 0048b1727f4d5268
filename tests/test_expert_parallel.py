"""Tests for backends/pytorch/expert_parallel.py (the expert-parallel runtime).

Distributed tests run 2 gloo ranks on 127.0.0.1 through ``run_ranks`` (spawned processes; a rank's
exception fails the test, a hang is killed after a timeout).  Every rank builds the same fp64 full
expert weights and every rank's tokens (seeded by rank), computes an independent per-token
reference over all ranks' tokens, and compares its own outputs and input gradients, and the expert
gradients summed over replicas and all-reduced over ranks, with the single-process reference.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from moec.backends.pytorch import expert_parallel as ep
from moec.backends.pytorch import runtime as rt
from moec.passes.place_experts import make_problem, place, round_robin

EP_PATH = Path(ep.__file__)
TOL = {"rtol": 1e-10, "atol": 1e-10}  # fp64 everywhere
TIMEOUT = 90.0


# --------------------------------------------------------------------------- reference


def _act(name, t):
    if name == "silu":
        return t / (1.0 + torch.exp(-t))
    if name == "gelu":
        return 0.5 * t * (1.0 + torch.erf(t / 2.0**0.5))
    if name == "relu":
        return t * (t > 0).to(t.dtype)
    raise AssertionError(name)


def reference_moe(x, ids, w, full, act):
    """Plain per-token, per-slot loop over the full ``[E, ...]`` expert tensors."""
    T, d = x.shape
    rows = []
    for t in range(T):
        acc = torch.zeros(d, dtype=x.dtype)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            u = x[t] @ full["up_proj"][e]
            if "up_bias" in full:
                u = u + full["up_bias"][e]
            if "gate_proj" in full:
                g = x[t] @ full["gate_proj"][e]
                if "gate_bias" in full:
                    g = g + full["gate_bias"][e]
                h = _act(act, g) * u
            else:
                h = _act(act, u)
            y = h @ full["down_proj"][e]
            if "down_bias" in full:
                y = y + full["down_bias"][e]
            acc = acc + w[t, j] * y
        rows.append(acc)
    out = torch.stack(rows) if rows else x.new_zeros(0, d)
    return out + 0.0 * (x.sum() + w.sum())  # zero (not None) gradients where nothing is routed


def make_full(E, d, f, glu, bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3

    full = {"up_proj": r(E, d, f), "down_proj": r(E, f, d)}
    if glu:
        full["gate_proj"] = r(E, d, f)
    if bias:
        full["up_bias"], full["down_bias"] = r(E, f), r(E, d)
        if glu:
            full["gate_bias"] = r(E, f)
    return full


def experts_on(phy2log, world, rank, start=0, size=None):
    """Group-local ids of the experts with a replica on `rank`."""
    s = len(phy2log) // world
    size = max(phy2log) + 1 - start if size is None else size
    return sorted({e - start for e in phy2log[rank * s:(rank + 1) * s] if start <= e < start + size})


def make_inputs(case, rank, world, E, k, d, phy2log, start=0, seed=0):
    """x [T, d], expert_ids [T, k], weights [T, k], cotangent [T, d] of `rank` for routing `case`."""
    gen = torch.Generator().manual_seed(1000 * seed + 17 * rank + 3)
    T = {0: 11, 1: 7}.get(rank, 5)
    if case == "empty" and rank == 1:
        T = 0
    if case == "hot_many":
        T = 23
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.long)
    if case == "random" and T > 2:
        ids[1, k - 1] = -1  # a dropped slot
        ids[T - 1, :] = -1  # a token with every slot dropped
    elif case == "remote":
        # every token of every rank goes only to experts with no replica on its own rank (slots
        # beyond the number of such experts are dropped; with none, the rank sends nothing)
        mine = set(experts_on(phy2log, world, rank, start, E))
        remote = torch.tensor([e for e in range(E) if e not in mine] + [-1] * k)
        n_remote = len(remote) - k
        ids = torch.stack([torch.cat([remote[torch.randperm(n_remote, generator=gen)], remote[n_remote:]])[:k]
                           for _ in range(T)]) if T else ids
    elif case in ("hot", "hot_many"):
        # all tokens to one expert (the one with the most replicas, the lowest id among those)
        cnt = [sum(1 for p in phy2log if p == start + e) for e in range(E)]
        hot = cnt.index(max(cnt))
        ids[:, 0] = hot
        if k > 1:
            others = [e for e in range(E) if e != hot]
            ids[:, 1:] = torch.tensor(others)[torch.randint(len(others), (T, k - 1), generator=gen)]
    elif case == "dropped" and rank == 0:
        ids[:] = -1  # rank 0 sends nothing (but still receives)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64)
    g = torch.randn(T, d, generator=gen, dtype=torch.float64)
    return x, ids, w, g


# --------------------------------------------------------------------------- one EP layer on a rank


def _check_layer(rank, world, cfg, case, dtype=torch.float64):
    """Run groups `cfg["groups"]` of one layer as separate moe_experts_ep calls, one backward through
    all of them, and compare with the reference.  Returns a small summary for the parent."""
    d, f, k, act = cfg["d"], cfg["f"], cfg["k"], cfg["act"]
    phy2log = cfg["phy2log"]
    summary = {}
    ep_losses, modules, leaves, refs = [], [], [], []
    for gi, (start, size) in enumerate(cfg["groups"]):
        full = make_full(size, d, f, cfg["glu"], cfg["bias"], seed=cfg["seed"] + gi)
        # reference over every rank's tokens (the expert gradients are those of the sum of all losses)
        full_ref = {n: t.clone().requires_grad_() for n, t in full.items()}
        total, mine = 0.0, None
        for r in range(world):
            x, ids, w, g = make_inputs(case, r, world, size, k, d, phy2log, start, seed=cfg["seed"] + gi)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = reference_moe(xr, ids, wr, full_ref, act)
            total = total + (y * g).sum()
            if r == rank:
                mine = (xr, wr, y.detach())
        total.backward()
        refs.append((full_ref, mine))

        local = ep.ExpertParallelExperts(phy2log, rank, world, d, f, cfg["glu"], cfg["bias"],
                                         experts=(start, size)).to(dtype)
        local.load_from_full(full)
        x, ids, w, g = make_inputs(case, rank, world, size, k, d, phy2log, start, seed=cfg["seed"] + gi)
        # "nograd": rank 1's x and weights need no gradient (its backward must still line up)
        needs_grad = not (case == "nograd" and rank == 1)
        x = x.to(dtype).requires_grad_(needs_grad)
        w = w.to(dtype).requires_grad_(needs_grad)
        y = ep.moe_experts_ep(x, ids, w, local, activation=act)
        assert y.dtype == dtype and y.shape == x.shape
        ep_losses.append((y.double() * g).sum())
        modules.append(local)
        leaves.append((x, w, y.detach()))
        summary[f"group{gi}_local_experts"] = local.local_experts
    sum(ep_losses).backward()  # one backward through all groups: the collectives must line up

    tol = TOL if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for (full_ref, (xr, wr, y_ref)), local, (x, w, y) in zip(refs, modules, leaves, strict=True):
        torch.testing.assert_close(y.double(), y_ref, **tol)
        if x.requires_grad:
            torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
            torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
        else:
            assert x.grad is None and w.grad is None
        grads = local.full_grads()
        assert set(grads) == set(full_ref)
        for name, t in full_ref.items():
            torch.testing.assert_close(grads[name].double(), t.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
        # replica gradient sync: every local slot ends with its logical expert's total gradient
        local.sync_replica_grads()
        for name, p in local._params():
            torch.testing.assert_close(p.grad.double(), full_ref[name].grad[local.local_experts], **tol)
        # the weights gather back (replicas identical)
        for name, t in local.full_state().items():
            torch.testing.assert_close(t.double(), full_ref[name].detach(), **tol)
    summary["rows"] = [int(x.shape[0]) for x, _, _ in leaves]
    summary["world"] = (dist.get_rank(), dist.get_world_size())
    return summary


def _scenarios(rank, world, cfgs, cases):
    out = {}
    for name, cfg in cfgs.items():
        for case in cases:
            out[(name, case)] = _check_layer(rank, world, cfg, case)
    return out


def _mixtral_cfg(phy2log, glu=True, bias=False, act="silu"):
    return {"phy2log": phy2log, "groups": [(0, 8)], "d": 16, "f": 32, "k": 2, "glu": glu, "bias": bias,
            "act": act, "seed": 5}


def _plan_phy2log(loads, devices, redundant, method=place, group_sizes=None):
    plan = method(make_problem(loads, devices, redundant, group_sizes=group_sizes)).to_json()
    return plan, plan["layers"][0]["phy2log"]


CASES = ["random", "remote", "empty", "hot", "dropped"]


# --------------------------------------------------------------------------- distributed tests


def test_distributed_mixtral_without_replicas():
    _, phy2log = _plan_phy2log([[1.0] * 8], 2, 0, method=round_robin)
    assert sorted(phy2log) == list(range(8))
    t0 = time.monotonic()
    res = ep.run_ranks(_scenarios, 2, {"mixtral": _mixtral_cfg(phy2log)}, CASES, timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT
    assert [res[r][("mixtral", "random")]["world"] for r in range(2)] == [(0, 2), (1, 2)]
    assert res[0][("mixtral", "empty")]["rows"] == [11] and res[1][("mixtral", "empty")]["rows"] == [0]
    # each rank holds 4 distinct experts, together all 8
    held = [res[r][("mixtral", "random")]["group0_local_experts"] for r in range(2)]
    assert len(held[0]) == len(held[1]) == 4 and sorted(held[0] + held[1]) == list(range(8))


def test_distributed_mixtral_with_replicas():
    # a skewed profile so that the hot experts get the R = 2 redundant replicas
    loads = [[9.0, 1.0, 1.0, 6.0, 1.0, 1.0, 1.0, 1.0]]
    plan, phy2log = _plan_phy2log(loads, 2, 2)
    assert len(phy2log) == 10 and max(plan["layers"][0]["logcnt"]) == 2
    cfgs = {
        "mixtral": _mixtral_cfg(phy2log),
        # 3 replicas of expert 0 (2 on rank 0, 1 on rank 1) and non-GLU experts with biases
        "bias_gelu": _mixtral_cfg([0, 1, 2, 3, 4, 5, 6, 7, 0, 0][::-1], glu=False, bias=True, act="gelu"),
    }
    cases = CASES + ["hot_many"]
    res = ep.run_ranks(_scenarios, 2, cfgs, cases, timeout=TIMEOUT)
    assert res[0][("mixtral", "hot")]["rows"] == [11]


def _moma_rank(rank, world, cfgs):
    out = _scenarios(rank, world, cfgs, ["random", "remote", "empty", "hot", "nograd"])
    # fp32 run against the fp64 reference (fp32 combine), and the host sync count per call
    cfg = cfgs["mixed"]
    _check_layer(rank, world, cfg, "random", dtype=torch.float32)
    calls = []
    originals = {}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        originals[name] = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=originals[name], _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        setattr(torch.Tensor, name, wrapper)
    torch.manual_seed(100 + rank)
    try:
        start, size = cfg["groups"][0]
        local = ep.ExpertParallelExperts(cfg["phy2log"], rank, world, cfg["d"], cfg["f"], True,
                                         experts=(start, size))
        x = torch.randn(9, cfg["d"], requires_grad=True)
        ids = torch.stack([torch.randperm(size)[:2] for _ in range(9)])
        w = torch.rand(9, 2)
        ep.moe_experts_ep(x, ids, w, local).sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    out["host_syncs"] = calls
    # forward without grad mode gives the same result (and records no graph)
    with torch.no_grad():
        y0 = ep.moe_experts_ep(x, ids, w, local)
    assert not y0.requires_grad
    torch.testing.assert_close(y0, ep.moe_experts_ep(x, ids, w, local).detach())
    # the module's own all-to-all agrees with torch.distributed.nn.functional's (deprecated) one
    import warnings

    import torch.distributed.nn.functional as dnnf

    in_splits = [3, 0] if rank == 0 else [2, 1]
    out_splits = [[3, 0], [2, 1]]
    out_splits = [out_splits[s][rank] for s in range(world)]
    a = torch.randn(sum(in_splits), 4, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ya = ep.all_to_all(a, out_splits, in_splits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yb = dnnf.all_to_all_single(torch.empty(sum(out_splits), 4, dtype=torch.float64), b, out_splits,
                                    in_splits)
    (ya * (rank + 1)).sum().backward()
    (yb * (rank + 1)).sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.grad, b.grad)
    return out


def test_distributed_moma_groups():
    """Two modality groups of one layer (text 0-3, image 4-7) as two calls, one backward."""
    # moec place's plan for examples/moma.moe-like loads with R = 2: rank 0 holds only text
    # experts, rank 1 only image ones, so the text module on rank 1 has no slot at all
    _, placed = _plan_phy2log([[1.0] * 8], 2, 2, group_sizes=[4, 4])
    assert len(placed) == 10
    mixed = [0, 4, 5, 1, 2, 6, 3, 7, 4, 0]  # both groups on both ranks, replicas of 0 and 4 across ranks
    cfgs = {
        "placed": {**_mixtral_cfg(placed), "groups": [(0, 4), (4, 4)], "k": 1},
        "mixed": {**_mixtral_cfg(mixed), "groups": [(0, 4), (4, 4)], "k": 2},
    }
    res = ep.run_ranks(_moma_rank, 2, cfgs, timeout=TIMEOUT)
    for r in range(2):
        assert res[r]["host_syncs"] == ["tolist"] * ep.HOST_SYNCS_EP, res[r]["host_syncs"]
    text = [res[r][("placed", "random")]["group0_local_experts"] for r in range(2)]
    if placed[:5] == [0, 0, 1, 2, 3]:  # the layout seen with torch 2.13 / this placer
        assert text[1] == []
    assert res[0][("mixed", "random")]["group1_local_experts"] == [0, 1]


# --------------------------------------------------------------------------- launcher behaviour


def _fail_on_rank1(rank, world):
    if rank == 1:
        raise RuntimeError("boom from rank 1")
    dist.barrier()  # rank 0 blocks here until rank 1's failure tears the run down
    return rank


def _hang(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


def test_run_ranks_propagates_a_rank_exception():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="boom from rank 1"):
        ep.run_ranks(_fail_on_rank1, 2, timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT


def test_run_ranks_kills_a_hang():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ep.run_ranks(_hang, 2, timeout=2.0)
    assert time.monotonic() - t0 < 20


# --------------------------------------------------------------------------- single process


def test_standalone_imports():
    """The file ships next to generated code: torch, the standard library and its sibling moec_runtime."""
    tree = ast.parse(EP_PATH.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "os", "socket", "tempfile", "time", "warnings", "datetime", "torch",
                     "moec_runtime"}, roots


@pytest.mark.parametrize("glu,bias,act", [(True, False, "silu"), (False, True, "gelu"), (True, True, "relu")])
def test_world1_matches_runtime_and_reference(glu, bias, act):
    E, k, d, f = 8, 2, 16, 32
    phy2log = [3, 0, 1, 2, 4, 5, 6, 7, 0, 3]  # replicas of 0 and 3 on the single rank
    full = make_full(E, d, f, glu, bias, seed=1)
    local = ep.ExpertParallelExperts(phy2log, 0, 1, d, f, glu, bias).double()
    local.load_from_full(full)
    x, ids, w, g = make_inputs("random", 0, 1, E, k, d, phy2log)
    x, w = x.requires_grad_(), w.requires_grad_()
    y = ep.moe_experts_ep(x, ids, w, local, activation=act)
    (y * g).sum().backward()

    full_ref = {n: t.clone().requires_grad_() for n, t in full.items()}
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = reference_moe(xr, ids, wr, full_ref, act)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(w.grad, wr.grad, **TOL)
    grads = local.full_grads()
    for name, t in full_ref.items():
        torch.testing.assert_close(grads[name], t.grad, **TOL)

    # and the runtime's own moe_experts agrees (same contract)
    y_rt = rt.moe_experts(x.detach(), ids, w.detach(), full["up_proj"], full["down_proj"], full.get("gate_proj"),
                          activation=act, up_bias=full.get("up_bias"), down_bias=full.get("down_bias"),
                          gate_bias=full.get("gate_bias"))
    torch.testing.assert_close(y.detach(), y_rt, **TOL)


def test_world1_edge_cases_and_replica_choice():
    d, f = 8, 12
    phy2log = [0, 1, 0, 0]  # expert 0 has 3 replicas: slots 0, 2, 3
    full = make_full(2, d, f, True, False, seed=2)
    local = ep.ExpertParallelExperts(phy2log, 0, 1, d, f, True).double()
    local.load_from_full(full)
    assert local.logcnt.tolist() == [3, 1] and local.log2phy.tolist() == [[0, 2, 3], [1, -1, -1]]
    # T = 0
    x = torch.zeros(0, d, dtype=torch.float64, requires_grad=True)
    y = ep.moe_experts_ep(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.float64), local)
    assert y.shape == (0, d)
    y.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for _, p in local._params())
    # replica choice: token t uses replica t mod 3 (rank 0): record which slot rows reach
    seen = []

    def spy(rows, sizes, module, activation):
        seen.append(list(sizes))
        return ep.local_grouped_ffn(rows, sizes, module, activation)

    T = 7
    ids = torch.zeros(T, 1, dtype=torch.long)
    x = torch.randn(T, d, dtype=torch.float64)
    w = torch.ones(T, 1, dtype=torch.float64)
    y = ep.moe_experts_ep(x, ids, w, local, expert_fn=spy)
    assert seen == [[3, 0, 2, 2]]  # slots 0, 2, 3 of expert 0 get tokens {0,3,6}, {1,4}, {2,5}
    torch.testing.assert_close(y, reference_moe(x, ids, w, full, "silu"), **TOL)
    # caller-given tables (lists are checked against phy2log)
    y2 = ep.moe_experts_ep(x, ids, w, local, log2phy=[[2, 3, 0], [1, -1, -1]], logcnt=[3, 1])
    torch.testing.assert_close(y2, y, **TOL)
    with pytest.raises(ValueError, match="does not match"):
        ep.moe_experts_ep(x, ids, w, local, log2phy=[[1, 2, 3], [0, -1, -1]], logcnt=[3, 1])
    with pytest.raises(ValueError, match="rows"):
        ep.moe_experts_ep(x, ids, w, local, log2phy=[[0, 2, 3]])
    # no grad mode: no graph
    with torch.no_grad():
        assert not ep.moe_experts_ep(x, ids, w, local).requires_grad


def test_world1_host_syncs(monkeypatch):
    local = ep.ExpertParallelExperts([0, 1, 2, 0], 0, 1, 8, 8, True)
    x = torch.randn(6, 8, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 0], [1, -1], [0, 2], [2, 1], [0, 1]])
    w = torch.rand(6, 2, requires_grad=True)
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=original, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    ep.moe_experts_ep(x, ids, w, local).sum().backward()
    monkeypatch.undo()
    assert calls == ["tolist"] * ep.HOST_SYNCS_EP


def test_init_matches_experts_rng_and_state_roundtrip():
    phy2log = [0, 1, 2, 3, 4, 5, 6, 7, 1, 6]
    for glu, bias in [(True, False), (False, True), (True, True)]:
        torch.manual_seed(7)
        ref = rt.Experts(8, 16, 32, glu=glu, bias=bias)
        after_ref = torch.rand(3)
        for rank in range(2):
            torch.manual_seed(7)
            local = ep.ExpertParallelExperts(phy2log, rank, 2, 16, 32, glu, bias)
            torch.testing.assert_close(torch.rand(3), after_ref)  # same RNG consumption
            assert len(local.local_slots) == 5
            for name, p in local._params():
                torch.testing.assert_close(p.detach(), getattr(ref, name).detach()[local.local_experts])
        # single rank: full_state gives the Experts tensors back
        torch.manual_seed(7)
        one = ep.ExpertParallelExperts(phy2log, 0, 1, 16, 32, glu, bias)
        state = one.full_state()
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(state[name], t)
        assert {n for n, _ in one.named_parameters()} == set(ref.state_dict())


def test_group_range_from_plan_and_load_full_state_dict():
    plan, phy2log = _plan_phy2log([[1.0] * 8], 2, 2, group_sizes=[4, 4])
    plan["layers"][0]["name"] = "layers.1.moe"
    img = ep.ExpertParallelExperts.from_plan(plan, "layers.1.moe", 1, 2, 16, 32, True, experts=(4, 4))
    assert img.num_experts == 4
    s = len(phy2log) // 2
    assert [img.expert_start + e for e in img.local_experts] == [p for p in phy2log[s:] if p >= 4]
    with pytest.raises(ValueError, match="devices"):
        ep.ExpertParallelExperts.from_plan(plan, 0, 0, 4, 16, 32, True)
    with pytest.raises(KeyError, match="layers.9.moe"):
        ep.ExpertParallelExperts.from_plan(plan, "layers.9.moe", 0, 2, 16, 32, True)

    # a rank model loads the single-device checkpoint
    class Block(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.experts = experts

    torch.manual_seed(3)
    single = Block(rt.Experts(4, 16, 32, glu=True))
    for rank in range(2):
        model = Block(ep.ExpertParallelExperts.from_plan(plan, 0, rank, 2, 16, 32, True, experts=(4, 4)))
        ep.load_full_state_dict(model, single.state_dict())
        torch.testing.assert_close(model.norm.weight, single.norm.weight)
        rows = model.experts.local_experts
        torch.testing.assert_close(model.experts.down_proj, single.experts.down_proj[rows])
        with pytest.raises(RuntimeError, match="unexpected"):
            ep.load_full_state_dict(model, {**single.state_dict(), "bogus": torch.zeros(1)})


def test_validation_errors():
    with pytest.raises(ValueError, match="divide evenly"):
        ep.ExpertParallelExperts([0, 1, 2], 0, 2, 4, 4, True)
    with pytest.raises(ValueError, match="no physical slot"):
        ep.ExpertParallelExperts([0, 0, 2, 2], 0, 2, 4, 4, True)
    with pytest.raises(ValueError, match="rank"):
        ep.ExpertParallelExperts([0, 1], 2, 2, 4, 4, True)
    local = ep.ExpertParallelExperts([0, 1], 0, 2, 4, 4, True)
    x, ids, w = torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match="built for rank 0 of 2"):
        ep.moe_experts_ep(x, ids, w, local)  # no process group: this is rank 0 of 1
    single = ep.ExpertParallelExperts([0, 1], 0, 1, 4, 4, True)
    with pytest.raises(ValueError, match="x must be"):
        ep.moe_experts_ep(torch.randn(3, 5), ids, w, single)
    with pytest.raises(ValueError, match="activation"):
        ep.moe_experts_ep(x, ids, w, single, activation="swish2")
    with pytest.raises(ValueError, match="must be"):
        single.load_from_full({"up_proj": torch.zeros(3, 4, 4), "gate_proj": torch.zeros(2, 4, 4),
                               "down_proj": torch.zeros(2, 4, 4)})
