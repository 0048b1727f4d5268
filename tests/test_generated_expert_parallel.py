"""The generated expert-parallel module, 2 gloo ranks: equal to the single-device model."""

from __future__ import annotations

import os
import sys

import moec
import pytest
import torch
from moec.backends.pytorch import expert_parallel as ep
from moec.cli import main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _rank(rank, world, path, plan, tokens_per_rank):
    torch.manual_seed(0)
    single = moec.load(path).double()
    model = moec.load(path, plan=plan, rank=rank, world_size=world).double()
    rt = sys.modules["moec_expert_parallel"]  # the runtime the generated module imported
    rt.load_full_state_dict(model, single.state_dict())
    n_mod = len(single.modalities)
    xs = [torch.randn(1, t, 64, dtype=torch.float64) for t in tokens_per_rank]
    mods = [torch.randint(0, n_mod, (1, t)) for t in tokens_per_rank]
    x, m = xs[rank].requires_grad_(True), mods[rank]
    out = model(x, m)
    (out.output.sum() + out.aux_loss).backward()
    ref_x = xs[rank].detach().clone().requires_grad_(True)
    ref = single(ref_x, m)
    (ref.output.sum() + ref.aux_loss).backward()
    torch.testing.assert_close(out.output, ref.output, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-10)
    dense = {n: p.grad for n, p in model.named_parameters() if ".experts." not in n}
    for name, p in single.named_parameters():
        if ".experts." not in name:
            torch.testing.assert_close(dense[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # expert grads: full tensors summed over ranks equal the single model's, summed over ranks too
    full = {}
    for name, module in model.named_modules():
        if isinstance(module, rt.ExpertParallelExperts):
            for k, g in module.full_grads().items():
                full[f"{name}.{k}"] = g
    ref_grads = {n: p.grad.clone() for n, p in single.named_parameters() if n in full}
    for g in ref_grads.values():
        torch.distributed.all_reduce(g)
    for name, g in full.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    return len(full)


@pytest.mark.parametrize(("example", "redundant", "tokens"), [("mixtral", 2, (6, 5)), ("moma", 0, (7, 0)),
                                                           ("moma_depth", 2, (7, 4)), ("recurrent_router", 0, (5, 6)),
                                                           ("chain_of_experts", 0, (5, 6))])  # experts shared by 2 steps
def test_generated_expert_parallel_matches_single_device(tmp_path, capsys, example, redundant, tokens):
    path = os.path.join(EXAMPLES, f"{example}.moe")
    plan_file = tmp_path / "plan.json"
    assert main(["place", path, "--devices", "2", "--redundant", str(redundant), "-o", str(plan_file)]) == 0
    import json

    plan = json.loads(plan_file.read_text())
    results = ep.run_ranks(_rank, 2, path, plan, tokens, timeout=120)
    assert all(r > 0 for r in results)


def test_train_with_plan_under_torchrun(tmp_path, capsys):
    import subprocess

    path = os.path.join(EXAMPLES, "mixtral.moe")
    plan = tmp_path / "plan.json"
    assert main(["place", path, "--devices", "2", "--redundant", "2", "-o", str(plan)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moec.cli", "train", path,
           "--plan", str(plan), "--steps", "4", "--tokens", "64"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "per-rank expert load" in result.stdout and "(down) on 2 ranks" in result.stdout


def test_train_with_plan_needs_torchrun(tmp_path, capsys):
    path = os.path.join(EXAMPLES, "mixtral.moe")
    plan = tmp_path / "plan.json"
    assert main(["place", path, "--devices", "2", "-o", str(plan)]) == 0
    os.environ.pop("WORLD_SIZE", None)
    assert main(["train", path, "--plan", str(plan), "--steps", "2"]) == 1
    assert "torchrun" in capsys.readouterr().err


def _balance_rank(rank, world):
    from moec.backends.pytorch.routers import BalancedRouter

    router = BalancedRouter(8, 4, rate=0.1).train()
    ids = torch.tensor([[0, 1]] * 5) if rank == 0 else torch.tensor([[2, 3], [2, 0]])
    router.observe(ids)
    router.update_bias()
    return router.score_bias.tolist()


def test_balancing_bias_updates_from_every_rank_tokens():
    """Data- or expert-parallel training: each rank's router counts its own tokens, and the bias
    update must use the global counts, or the ranks' copies of the bias drift apart."""
    from moec.backends.pytorch.routers import BalancedRouter

    biases = ep.run_ranks(_balance_rank, 2, timeout=60)
    single = BalancedRouter(8, 4, rate=0.1).train()
    single.observe(torch.tensor([[0, 1]] * 5 + [[2, 3], [2, 0]]))
    single.update_bias()
    assert biases[0] == biases[1] == single.score_bias.tolist()


@pytest.mark.parametrize(("plan", "message"), [
    ([1, 2], "not a placement plan"),
    ({}, "not a placement plan"),
    ({"num_devices": 2, "layers": [{"name": "layers.0.moe"}]}, "needs a `name` and a `phy2log`"),
    ({"num_devices": 0, "layers": []}, "`num_devices` must be a positive integer"),
    ("moma", "it was made for another model"),
    ({"num_devices": 2, "layers": [{"name": f"layers.{i}.moe", "phy2log": list(range(16))} for i in range(2)]},
     "places 16 experts (ids 0..15) but the layer has 8 (ids 0..7)"),
    ({"num_devices": 3, "layers": [{"name": f"layers.{i}.moe", "phy2log": list(range(8))} for i in range(2)]},
     "has 8 expert slots, which do not divide over its 3 devices"),
])
def test_a_plan_that_does_not_fit_the_model_is_refused(tmp_path, capsys, plan, message):
    import json

    if plan == "moma":
        assert main(["place", os.path.join(EXAMPLES, "moma.moe"), "-n", "2", "-o", str(tmp_path / "moma.json")]) == 0
        plan = json.loads((tmp_path / "moma.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    rc = main(["compile", os.path.join(EXAMPLES, "mixtral.moe"), "--plan", str(tmp_path / "plan.json"),
               "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("moec: error: placement plan: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_train_with_a_plan_for_other_devices_is_refused_before_starting(tmp_path, capsys, monkeypatch):
    """Checked before the ranks wait for each other (no process group is started)."""
    from moec.train import _run_expert_parallel

    path = os.path.join(EXAMPLES, "mixtral.moe")
    assert main(["place", path, "-n", "4", "-o", str(tmp_path / "plan4.json")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _run_expert_parallel(path, 1, 32, 16, 1e-3, 0, str(tmp_path / "plan4.json")) == 1
    assert "places experts on 4 devices, but torchrun started 2 ranks" in capsys.readouterr().err


def test_load_full_state_dict_of_the_package_loads_a_generated_rank_model(tmp_path):
    """The generated module imports its own copy of the runtime (`moec_expert_parallel`): the
    package's `load_full_state_dict` recognises its expert modules too."""
    import json

    path = os.path.join(EXAMPLES, "mixtral.moe")
    assert main(["place", path, "-n", "2", "-o", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    model = moec.load(path, plan=plan, rank=1, world_size=2)
    single = moec.load(path, seed=3)
    ep.load_full_state_dict(model, single.state_dict())
    experts = [(n, m) for n, m in model.named_modules() if hasattr(m, "load_from_full")]
    assert experts
    for name, module in experts:
        full = single.get_submodule(name).up_proj
        torch.testing.assert_close(module.up_proj, full[module.local_expert_ids], rtol=0, atol=0)
