"""Expert placement (passes/place_experts.py): plan invariants, quality against EPLB, errors, IR."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moec.driver import compile_model
from moec.passes import PassContext
from moec.passes.place_experts import (
    ExpertGroup,
    LayerProblem,
    PlaceExperts,
    PlacementError,
    PlacementProblem,
    eplb_baseline,
    format_plan,
    make_problem,
    parse_bytes,
    parse_modality_devices,
    place,
    problem_from_graph,
    round_robin,
)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
METHODS = (place, eplb_baseline, round_robin)


def zipf(num_experts: int, a: float, rng: random.Random, tokens: float = 100_000.0) -> list[float]:
    w = [1.0 / (k + 1) ** a for k in range(num_experts)]
    rng.shuffle(w)
    total = sum(w)
    return [tokens * x / total for x in w]


def check_plan(problem: PlacementProblem, plan) -> dict:
    """Every invariant of a plan, checked on its JSON form; returns the JSON."""
    js = json.loads(json.dumps(plan.to_json()))  # plain JSON, no NaN/inf
    n, r = problem.num_devices, problem.redundant
    assert js["num_devices"] == n and js["redundant"] == r
    assert len(js["layers"]) == len(problem.layers)
    width = max(max(lay["logcnt"]) for lay in js["layers"]) if js["layers"] else 1
    for lp, lay in zip(problem.layers, js["layers"]):
        e = lp.num_experts
        p = e + r
        s = p // n
        phy2log, logcnt, log2phy = lay["phy2log"], lay["logcnt"], lay["log2phy"]
        assert lay["layer"] == lp.layer
        assert len(phy2log) == p and all(0 <= x < e for x in phy2log)
        assert len(logcnt) == e and all(c >= 1 for c in logcnt) and sum(logcnt) == p
        assert logcnt == [phy2log.count(x) for x in range(e)]
        assert len(log2phy) == e and all(len(row) == width for row in log2phy)
        for x, row in enumerate(log2phy):
            slots = [q for q in row if q != -1]
            assert row == slots + [-1] * (width - len(slots))  # padding only at the end
            assert len(slots) == logcnt[x] and all(phy2log[q] == x for q in slots)
        assert lay["device_of_slot"] == [q // s for q in range(p)]
        assert [lay["device_of_slot"].count(d) for d in range(n)] == [s] * n  # same number of slots
        per = [lp.load[x] / logcnt[x] for x in range(e)]
        loads = [sum(per[x] for x in phy2log[d * s:(d + 1) * s]) for d in range(n)]
        assert lay["device_load"] == pytest.approx(loads, rel=1e-9, abs=1e-9)
        assert sum(lay["device_load"]) == pytest.approx(sum(lp.load), rel=1e-9, abs=1e-9)
        mem = [sum(lp.expert_bytes[x] for x in phy2log[d * s:(d + 1) * s]) for d in range(n)]
        assert lay["memory_bytes"] == mem
        mean = sum(loads) / n
        assert lay["max_mean_load"] == pytest.approx(max(loads) / mean if mean else 1.0, rel=1e-9)
    assert js["memory_bytes"] == [sum(lay["memory_bytes"][d] for lay in js["layers"]) for d in range(n)]
    if problem.memory_limit is not None and plan.method == "place":
        assert max(js["memory_bytes"]) <= problem.memory_limit
        assert js["memory_ok"]
    return js


# ---- sizes ---------------------------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("4096") == 4096
    assert parse_bytes(1000) == 1000
    assert parse_bytes("2t") == 2 * 10**12
    for bad in ("", "GB", "80 parsecs", "-1GB", "0", "1e3GB", "12 34", True):
        with pytest.raises(ValueError, match="invalid memory size"):
            parse_bytes(bad)


def test_parse_modality_devices():
    assert parse_modality_devices("image=0-3,text=4-7") == {"image": [0, 1, 2, 3], "text": [4, 5, 6, 7]}
    assert parse_modality_devices("image=0-1,5; text=2") == {"image": [0, 1, 5], "text": [2]}
    for bad in ("image", "image=", "=1", "image=3-1", "image=x"):
        with pytest.raises(ValueError, match="invalid"):
            parse_modality_devices(bad)


# ---- invariants ----------------------------------------------------------------------------------
def _random_problem(rng: random.Random) -> PlacementProblem:
    n = rng.choice([1, 2, 3, 4, 8])
    e = rng.randint(max(1, n // 2), 40)
    r = rng.randint(0, 2 * n)
    r += (-(e + r)) % n  # E + R divisible by N
    if e + r < n:
        r += n
    sizes, left = [], e
    while left:
        k = rng.randint(1, left)
        sizes.append(k)
        left -= k
    layers = []
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(["uniform", "zipf", "random", "zeros"])
        load = ([10.0] * e if kind == "uniform" else zipf(e, rng.uniform(0.5, 2.0), rng) if kind == "zipf"
                else [0.0] * e if kind == "zeros" else [float(rng.randint(0, 1000)) for _ in range(e)])
        groups, start = [], 0
        for j, k in enumerate(sizes):
            homes = tuple(sorted(rng.sample(range(n), rng.randint(1, n)))) if rng.random() < 0.3 else None
            groups.append(ExpertGroup(f"g{j}", start, k, home_devices=homes))
            start += k
        layers.append(LayerProblem(2 * i + 1, load, [rng.choice([100, 100, 300])] * e, groups,
                                   d_model=rng.choice([0, 16])))
    return PlacementProblem(layers, n, r)


def test_invariants_random_problems():
    rng = random.Random(1234)
    for _ in range(150):
        problem = _random_problem(rng)
        plans = [check_plan(problem, m(problem)) for m in METHODS]
        assert plans[0]["max_mean_load"] <= plans[1]["max_mean_load"]  # place never worse than EPLB


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 24), st.integers(0, 12), st.integers(1, 4),
       st.lists(st.integers(0, 10_000), min_size=24, max_size=24))
def test_invariants_hypothesis(n, e, r, n_groups, raw):
    r += (-(e + r)) % n
    if e + r < n:
        r += n
    n_groups = min(n_groups, e)
    sizes = [e // n_groups + (1 if g < e % n_groups else 0) for g in range(n_groups)]
    problem = make_problem([[float(x) for x in raw[:e]]], n, r, expert_bytes=7, group_sizes=sizes)
    ours, eplb, _ = (check_plan(problem, m(problem)) for m in METHODS)
    assert ours["max_mean_load"] <= eplb["max_mean_load"]


def test_memory_limit_respected_with_mixed_expert_sizes():
    # experts 0,1 are 4 bytes, 2,3 are 1 byte; balance alone would pair {0,1} and {2,3} (8 bytes)
    layer = LayerProblem(0, [10.0, 1.0, 10.0, 1.0], [4, 4, 1, 1],
                         [ExpertGroup("big", 0, 2), ExpertGroup("small", 2, 2)])
    problem = PlacementProblem([layer], 2, 0, memory_limit=5)
    js = check_plan(problem, place(problem))
    assert js["memory_bytes"] == [5, 5]
    assert js["layers"][0]["device_load"] == [11.0, 11.0]
    eplb = eplb_baseline(problem).to_json()  # EPLB ignores memory
    assert eplb["memory_bytes"] == [8, 2] and not eplb["memory_ok"]


def test_memory_random_mixed_sizes():
    # two groups with different expert sizes, 1-3 layers, limit 10-50% above the lower bound
    from moec.passes.place_experts import _memory_lower_bound

    rng = random.Random(11)
    for _ in range(60):
        n = rng.choice([2, 3, 4, 8])
        e = rng.choice([8, 12, 16, 24])
        r = (-e) % n + n * rng.randint(0, 1)
        half = e // 2
        layers = []
        for i in range(rng.randint(1, 3)):
            small, big = rng.choice([(1, 2), (1, 3), (2, 5)])
            load = zipf(e, 1.0, rng) if rng.random() < 0.5 else [float(rng.randint(0, 100)) for _ in range(e)]
            groups = [ExpertGroup("a", 0, half), ExpertGroup("b", half, e - half, home_devices=(0,))]
            layers.append(LayerProblem(i, load, [big] * half + [small] * (e - half), groups, d_model=4))
        problem = PlacementProblem(layers, n, r)
        problem.memory_limit = max(int(_memory_lower_bound(problem) * rng.uniform(1.1, 1.5)),
                                   _memory_lower_bound(problem))
        js = check_plan(problem, place(problem))
        assert max(js["memory_bytes"]) <= problem.memory_limit


def test_memory_spread_over_layers():
    # per layer a device holds one 3-byte and one 1-byte expert or two of a kind; 2 layers, limit 8
    layers = [LayerProblem(i, [5.0, 5.0, 1.0, 1.0], [3, 3, 1, 1]) for i in range(2)]
    problem = PlacementProblem(layers, 2, 0, memory_limit=8)
    js = check_plan(problem, place(problem))
    assert max(js["memory_bytes"]) <= 8


# ---- quality -------------------------------------------------------------------------------------
def test_never_worse_than_eplb_on_uniform_zipf_and_groups():
    rng = random.Random(7)
    for n, r in ((4, 0), (4, 4), (8, 8), (16, 0), (16, 16), (32, 32), (64, 64)):
        for kind in ("uniform", "zipf"):
            for groups in (None, [128, 128], [64, 192]):
                loads = [[100.0] * 256 if kind == "uniform" else zipf(256, 1.2, rng) for _ in range(2)]
                problem = make_problem(loads, n, r, group_sizes=groups)
                ours, base = place(problem), eplb_baseline(problem)
                assert ours.max_mean_load <= base.max_mean_load, (n, r, kind, groups)
                for a, b in zip(ours.layers, base.layers):
                    assert max(a.device_load) <= max(b.device_load)


def test_skewed_with_groups_strictly_better_than_eplb():
    """Zipf(1.2) loads, two modality groups, 64 devices, 64 redundant replicas: Webster replication
    + swaps give a strictly lower max/mean load than EPLB, and fewer devices per group."""
    rng = random.Random(3)
    problem = make_problem([zipf(256, 1.2, rng) for _ in range(3)], 64, 64, group_sizes=[128, 128])
    ours, base = place(problem), eplb_baseline(problem)
    check_plan(problem, ours)
    assert ours.max_mean_load < base.max_mean_load - 0.01
    assert all(max(a.device_load) < max(b.device_load) for a, b in zip(ours.layers, base.layers))
    spread = sum(sum(lp.group_devices.values()) for lp in ours.layers)
    assert spread < sum(sum(lp.group_devices.values()) for lp in base.layers)


def test_skewed_groups_without_redundancy_stay_together():
    """Zipf(1.2), two modality groups, 64 devices x 4 slots, no redundant replicas: the device of
    the hottest expert keeps its few light partners and the other replicas are packed group by
    group, so each group sits on about the 32 devices its 128 experts need (EPLB: ~120 in all)."""
    rng = random.Random(3)
    problem = make_problem([zipf(256, 1.2, rng) for _ in range(3)], 64, 0, group_sizes=[128, 128])
    ours, base = place(problem), eplb_baseline(problem)
    check_plan(problem, ours)
    assert ours.max_mean_load == base.max_mean_load  # the hottest expert sets the maximum
    for lp in ours.layers:
        assert 64 <= sum(lp.group_devices.values()) <= 68


def test_replication_reports_ties():
    # 8, 4, 2, 1 with 2 extra replicas: the second pick is a tie between expert 0 (8 / 2) and
    # expert 1 (4 / 1), so the tie-break decides; with 9 instead of 8 there is no tie and every
    # tie-break replicates alike
    from moec.passes.place_experts import _replicate

    assert _replicate([8.0, 4.0, 2.0, 1.0], 2) == ([3, 1, 1, 1], [0, 1, 2, 3, 0, 0], True)
    assert _replicate([8.0, 4.0, 2.0, 1.0], 2, [3, 2, 1, 0])[:2] == ([2, 2, 1, 1], [0, 1, 2, 3, 0, 1])
    untied = _replicate([9.0, 4.0, 2.0, 1.0], 2)
    assert untied == ([3, 1, 1, 1], [0, 1, 2, 3, 0, 0], False)
    assert _replicate([9.0, 4.0, 2.0, 1.0], 2, [3, 2, 1, 0]) == untied


def test_uniform_groups_equal_balance_better_locality():
    """Uniform loads: every method is perfectly balanced; place keeps each group on the fewest devices."""
    problem = make_problem([[1.0] * 256], 8, 8, group_sizes=[128, 128])
    ours, base = place(problem), eplb_baseline(problem)
    assert ours.max_mean_load == base.max_mean_load == 1.0
    assert ours.layers[0].group_devices == {"g0": 4, "g1": 4}
    assert base.layers[0].group_devices == {"g0": 8, "g1": 8}


def test_hand_solved_small_case():
    # loads 3,3,2,2,2,0 on 2 devices x 3 slots: EPLB's greedy packing gives {3,2,2} | {3,2,0} = 7 | 5;
    # the optimum is {3,3,0} | {2,2,2} = 6 | 6
    problem = make_problem([[3.0, 3.0, 2.0, 2.0, 2.0, 0.0]], 2, 0)
    base = eplb_baseline(problem).layers[0]
    assert base.phy2log == [0, 2, 4, 1, 3, 5] and base.device_load == [7.0, 5.0]
    ours = place(problem).layers[0]
    assert ours.device_load == [6.0, 6.0] and ours.max_mean_load == 1.0
    assert sorted(map(sorted, (ours.phy2log[:3], ours.phy2log[3:]))) == [[0, 1, 5], [2, 3, 4]]


def test_hand_solved_replication():
    # expert 0 carries 8 of 12 tokens; 2 redundant slots both go to it (8/2 = 4 > 2, then 8/3 > 2)
    problem = make_problem([[8.0, 2.0, 1.0, 1.0]], 2, 2)
    for method in (place, eplb_baseline):
        lay = method(problem).layers[0]
        assert lay.logcnt == [3, 1, 1, 1]
        assert max(lay.device_load) == pytest.approx(8 / 3 * 2 + 1)  # two replicas share a device


def test_uniform_groups_contiguous_and_home_devices():
    problem = make_problem([[1.0] * 8], 2, 0, group_sizes=[4, 4])
    assert place(problem).layers[0].phy2log == [0, 1, 2, 3, 4, 5, 6, 7]
    assert eplb_baseline(problem).layers[0].phy2log == [0, 2, 4, 6, 1, 3, 5, 7]
    # group 1's tokens live on device 0, group 0's on device 1: each group moves to its tokens
    problem = make_problem([[1.0] * 4], 2, 0, group_sizes=[2, 2], d_model=8, home_devices=[(1,), (0,)])
    ours = place(problem).layers[0]
    assert ours.phy2log == [2, 3, 0, 1]
    assert ours.all_to_all_bytes == 0.0
    base = eplb_baseline(problem).layers[0]
    assert base.all_to_all_bytes == 2 * 2 * 8 * 2 * 1.0  # 2 remote slots x load 1 x d x 2 bytes x 2


def test_traffic_model_uniform_homes():
    # tokens homed uniformly on N devices: (N-1)/N of all routed tokens cross devices, both ways
    problem = make_problem([zipf(16, 1.0, random.Random(0))], 4, 0, d_model=32)
    for m in METHODS:
        plan = m(problem)
        assert plan.all_to_all_bytes_per_step == pytest.approx(100_000 * 3 / 4 * 32 * 2 * 2)


def test_speed_256_experts_64_devices_61_layers():
    rng = random.Random(0)
    problem = make_problem([zipf(256, 1.2, rng) for _ in range(61)], 64, 64)
    start = time.perf_counter()
    place(problem)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0  # ~0.1 s on an idle core; generous for loaded CI machines


# ---- errors --------------------------------------------------------------------------------------
def test_error_indivisible_slots():
    with pytest.raises(PlacementError, match=r"10 experts \+ 0 redundant .* 4 devices; use --redundant 2"):
        place(make_problem([[1.0] * 10], 4, 0))
    with pytest.raises(PlacementError, match="do not divide evenly"):
        eplb_baseline(make_problem([[1.0] * 8], 3, 0))


def test_error_impossible_memory():
    problem = make_problem([[1.0] * 8] * 2, 2, 0, expert_bytes=1000, memory_limit=7999)
    with pytest.raises(PlacementError, match="memory limit .* too small.*at least 7.81 KiB"):
        place(problem)
    problem.memory_limit = 8000
    assert max(place(problem).memory_bytes) == 8000


def test_error_bad_problem():
    with pytest.raises(PlacementError, match="number of devices"):
        place(make_problem([[1.0] * 4], 0))
    with pytest.raises(PlacementError, match="non-negative"):
        place(make_problem([[1.0, -1.0]], 2))
    with pytest.raises(PlacementError, match="group sizes"):
        make_problem([[1.0] * 4], 2, group_sizes=[1, 2])
    with pytest.raises(PlacementError, match="homed on device 5"):
        place(make_problem([[1.0] * 4], 2, 0, group_sizes=[2, 2], home_devices=[(5,), None]))


# ---- from the IR ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepseek():
    return compile_model(os.path.join(EXAMPLES, "deepseek_moe.moe")).graph


@pytest.fixture(scope="module")
def moma():
    return compile_model(os.path.join(EXAMPLES, "moma.moe")).graph


def test_problem_from_graph_deepseek(deepseek, tmp_path):
    problem = problem_from_graph(deepseek, 4, memory_bytes="1MiB", redundant=4)
    assert [lp.layer for lp in problem.layers] == [1, 2]  # layer 0 is dense
    for lp in problem.layers:
        assert lp.num_experts == 16 and lp.d_model == 64 and lp.name == f"layers.{lp.layer}.moe"
        assert [(g.name, g.start, g.size, g.top_k) for g in lp.groups] == [("all", 0, 16, 4)]
        assert lp.expert_bytes == [3 * 64 * 64 * 2] * 16  # glu(64, 64) in bf16
        assert lp.load == [1.0] * 16
    assert problem.memory_limit == 2**20
    check_plan(problem, place(problem))
    # a routing profile as `moec train --profile` writes it
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"model": "deepseek_moe", "steps": 3,
                                "tokens_per_expert": [list(range(16)), [5] * 16]}))
    problem = problem_from_graph(deepseek, 4, profile=str(path))
    assert problem.layers[0].load == [float(x) for x in range(16)]
    js = check_plan(problem, place(problem))
    assert js["layers"][0]["max_mean_load"] == 1.0  # 0..15 splits evenly into 4 x 4


def test_problem_from_graph_moma_groups(moma):
    problem = problem_from_graph(moma, 2, modality_devices={"image": [1]})
    assert [lp.layer for lp in problem.layers] == [1, 3]
    lp = problem.layers[0]
    assert [(g.name, g.start, g.size, g.top_k, g.modalities, g.home_devices) for g in lp.groups] == [
        ("text", 0, 4, 1, ("text",), None), ("image", 4, 4, 1, ("image",), (1,))]
    assert lp.expert_bytes == [3 * 64 * 128 * 2] * 8
    plan = place(problem)
    check_plan(problem, plan)
    assert plan.layers[0].phy2log == [0, 1, 2, 3, 4, 5, 6, 7]  # image experts on its tokens' device
    assert plan.layers[0].group_devices == {"text": 1, "image": 1}


def test_modality_devices_errors(moma):
    assert problem_from_graph(moma, 2, modality_devices="image=1").layers[0].groups[1].home_devices == (1,)
    with pytest.raises(PlacementError, match=r"unknown modality `imgae` .*route: image, text\)"):
        problem_from_graph(moma, 2, modality_devices={"imgae": [0]})
    with pytest.raises(PlacementError, match="only 2 devices"):
        problem_from_graph(moma, 2, modality_devices="image=0-3")


def test_problem_from_graph_unfused_and_unlowered(moma):
    fused = problem_from_graph(moma, 2)
    for kw in ({"pipeline": "unfused"}, {"pipeline": "frontend"}):
        graph = compile_model(os.path.join(EXAMPLES, "moma.moe"), **kw).graph
        other = problem_from_graph(graph, 2)
        assert [(lp.layer, lp.expert_bytes, lp.groups, lp.d_model) for lp in other.layers] == \
            [(lp.layer, lp.expert_bytes, lp.groups, lp.d_model) for lp in fused.layers]


def test_profile_errors(deepseek, moma, tmp_path):
    with pytest.raises(PlacementError, match=r"profile has 3 MoE layers but the model has 2 "
                                             r"\(layers.1.moe, layers.2.moe\)"):
        problem_from_graph(deepseek, 4, profile={"tokens_per_expert": [[1] * 16] * 3})
    with pytest.raises(PlacementError, match="layer 0 has 4 experts but layers.1.moe has 8"):
        problem_from_graph(moma, 2, profile=[[1, 2, 3, 4], [1] * 8])
    with pytest.raises(PlacementError, match="no `tokens_per_expert`"):
        problem_from_graph(moma, 2, profile={"steps": 1})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(PlacementError, match="not valid JSON"):
        problem_from_graph(moma, 2, profile=str(bad))
    with pytest.raises(PlacementError, match="cannot read"):
        problem_from_graph(moma, 2, profile=str(tmp_path / "missing.json"))


def test_pass_records_plan_and_keeps_graph(moma):
    before = moma.print()
    ctx = PassContext()
    assert PlaceExperts().run(moma, ctx) is False and "placement" not in ctx.results  # devices unset
    p = PlaceExperts(devices=4, memory="1MiB", redundant=0)
    assert p.name == "place-experts"
    assert p.run(moma, ctx) is False
    assert moma.print() == before
    js = ctx.results["placement"]
    assert js["num_devices"] == 4 and len(js["layers"]) == 2 and js["memory_ok"]
    ctx = PassContext()
    PlaceExperts(devices=2, method="round-robin").run(moma, ctx)
    assert ctx.results["placement"]["method"] == "round-robin"
    with pytest.raises(PlacementError, match="unknown placement method"):
        PlaceExperts(devices=2, method="magic").run(moma, ctx)
    with pytest.raises(PlacementError, match="do not divide evenly"):
        PlaceExperts(devices=3).run(moma, ctx)


def test_format_plan(moma):
    problem = problem_from_graph(moma, 2, memory_bytes="1MiB", redundant=2,
                                 profile=[[5, 1, 1, 1, 2, 2, 2, 2], [1] * 8])
    text = format_plan(place(problem).to_json())
    assert "expert placement: place, 2 devices, 2 redundant" in text
    assert "layers.1.moe" in text and "layers.3.moe" in text
    assert "memory limit 1.00 MiB per device: fits" in text
    assert "worst layer max/mean load" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("device"))
    assert [line.split()[0] for line in lines[head + 2:head + 4]] == ["0", "1"]


def test_cli_place_and_report_plan(tmp_path, capsys):
    import json
    import os

    from moec.cli import main

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "moma.moe")
    plan = tmp_path / "plan.json"
    assert main(["place", path, "--devices", "4", "--redundant", "4", "-o", str(plan)]) == 0
    data = json.loads(plan.read_text())
    assert data["num_devices"] == 4 and all({"phy2log", "log2phy", "logcnt"} <= set(layer) for layer in data["layers"])
    capsys.readouterr()
    assert main(["report", "--plan", str(plan)]) == 0
    assert "max/mean" in capsys.readouterr().out
    assert main(["place", path, "--devices", "3"]) == 1
    err = capsys.readouterr().err
    assert "do not divide evenly" in err and "Traceback" not in err
    assert main(["place", path, "--devices", "4", "--memory", "lots"]) == 1


def test_placement_section_gives_defaults_and_is_checked(tmp_path, capsys):
    import json

    from moec.cli import main
    from moec.driver import check

    src = """model m {
  input(dim = 16)
  block b { moe { experts 8 x glu(16, 8); router top_k(k = 2) } }
  layers { b b }
  placement { devices = 4; redundant = 4; memory = "1GB" }
}
"""
    path = tmp_path / "m.moe"
    path.write_text(src)
    out = tmp_path / "plan.json"
    assert main(["place", str(path), "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["num_devices"] == 4 and plan["redundant"] == 4
    assert main(["place", str(path), "--devices", "2", "--redundant", "0", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["num_devices"] == 2  # the command line wins
    bad = tmp_path / "bad.moe"
    bad.write_text(src.replace("devices = 4", "devics = 4").replace("redundant = 4", "redundant = -1"))
    codes = sorted(d.code for d in check(str(bad)).items)
    assert codes == ["E0204", "E0207"], codes
    nodev = tmp_path / "nodev.moe"
    nodev.write_text(src.replace("devices = 4; ", ""))
    capsys.readouterr()
    assert main(["place", str(nodev)]) == 1 and "--devices" in capsys.readouterr().err


def test_lora_experts_move_their_adapters_only():
    """A LoRA expert's own memory is its adapters; the frozen base FFN is shared by the pool."""
    from moec.passes.place_experts import _moe_layers

    for pipeline in ("default", "unfused"):
        comp = compile_model(os.path.join(EXAMPLES, "lora_experts.moe"), pipeline=pipeline)
        moe = comp.graph.op(comp.graph.find("fused_experts" if pipeline == "default" else "expert_gemm")[0])
        expert = moe.expert if pipeline == "default" else None
        params = [g["params"] for layer in _moe_layers(comp.graph) for g in layer["groups"]]
        assert params and all(p == params[0] for p in params)
        if expert is not None:
            assert params[0] == expert.adapter_params < expert.params


def test_profile_rows_lead_with_attention_expert_counts(tmp_path):
    """`moec train --profile` writes one row per layer with routed experts, attention experts first;
    placement reads the MoE experts' columns of the MoE layers' rows."""
    path = tmp_path / "moa.moe"
    path.write_text("""model moa {
  input(dim = 16)
  block dense { attention(heads = 2, experts = 3, top_k = 1); glu(16, 8) }
  block sparse { attention(heads = 2, experts = 3, top_k = 1); moe { experts 4 x glu(16, 8); router top_k(k = 1) } }
  layers { dense; sparse }
}
""")
    graph = compile_model(str(path)).graph
    problem = problem_from_graph(graph, devices=2, profile=[[5, 6, 7], [1, 2, 3, 40, 30, 20, 10]])
    assert [layer.load for layer in problem.layers] == [[40, 30, 20, 10]]


def test_report_json_with_a_plan_is_one_document(tmp_path, capsys):
    """`report --json --plan`: the analysis with the plan under "placement", nothing else on stdout."""
    from moec.cli import main

    path = os.path.join(EXAMPLES, "mixtral.moe")
    assert main(["place", path, "-n", "2", "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["report", path, "--plan", str(tmp_path / "plan.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["placement"] == json.loads((tmp_path / "plan.json").read_text())
    assert report["model"] == "mixtral"
    assert main(["report", "--plan", str(tmp_path / "plan.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report["placement"]
