"""Router kinds in the language: misuse gives diagnostics at the right place; every kind compiles
to a model equal to its dynamic form in the static export form."""

from __future__ import annotations

import moec
import pytest
import torch
from moec.driver import check

MODEL = """model m {{
  const d = 16
  modality text, image
  input(dim = d, modalities = [text, image])
  block b {{ moe {{ {body} }} }}
  layers {{ b }}
}}
"""


def diags(tmp_path, body):
    path = tmp_path / "m.moe"
    path.write_text(MODEL.format(body=body))
    return check(str(path)), MODEL.format(body=body)


@pytest.mark.parametrize(("router", "code", "needle"), [
    ("group_limited(k = 2, groups = 3, top_groups = 1)", "E0206", "groups = 3"),
    ("group_limited(k = 2, groups = 4, top_groups = 5)", "E0206", "top_groups = 5"),
    ("group_limited(k = 5, groups = 4, top_groups = 2)", "E0208", "k = 5"),
    ("dynamic_k(threshold = 1.5)", "E0206", "threshold = 1.5"),
    ("dynamic_k(threshold = 0.5, k_min = 5, k_max = 3)", "E0206", "k_min = 5"),
    ("dynamic_k(threshold = 0.5, k_max = 9)", "E0208", "k_max = 9"),
    ("expert_choice(capacity = 0)", "E0207", "capacity = 0"),
    ("expert_choise(capacity = 1.0)", "E0204", "expert_choise"),
    ("deterministic(by = position)", "E0206", "by = position"),
    ("top_k(k = 2, drop = random)", "E0206", "drop = random"),
    ("top_k(k = 2, jitter = -0.1)", "E0206", "jitter = -0.1"),
])
def test_router_misuse(tmp_path, router, code, needle):
    d, text = diags(tmp_path, f"experts 8 x glu(d, 8); router {router}")
    found = [x for x in d.items if x.code == code]
    assert found, d.render()
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)
    assert found[0].loc.line == line and found[0].loc.col == text.splitlines()[line - 1].index(needle) + 1
    if router.startswith("expert_choise"):
        assert found[0].hint == "did you mean `expert_choice`?"


def test_deterministic_modality_needs_an_expert_per_modality(tmp_path):
    d, _ = diags(tmp_path, "experts 1 x glu(d, 8); router deterministic(by = modality)")
    assert any(x.code == "E0206" and "expert per modality" in x.message for x in d.items), d.render()


def test_task_routing_inside_a_group_is_rejected(tmp_path):
    d, _ = diags(tmp_path, "group text { experts 2 x glu(d, 8); router deterministic(by = task) }\n"
                           "group image { experts 2 x glu(d, 8); router top_k(k = 1) }")
    assert any(x.code == "E0206" and "inside a modality group" in x.message for x in d.items), d.render()


@pytest.mark.parametrize("router", ["expert_choice(capacity = 1.5)", "dynamic_k(threshold = 0.6, k_max = 3)",
                                    "soft()", "group_limited(k = 2, groups = 4, top_groups = 2)",
                                    "top_k(k = 2, capacity = 0.75)", "deterministic(by = hash)"])
def test_static_form_of_every_router(tmp_path, router):
    path = tmp_path / "m.moe"
    path.write_text(MODEL.format(body=f"experts 8 x glu(d, 8); router {router}; loss load_balance(0.01)"))
    dynamic, static = moec.load(str(path)).double(), moec.load(str(path), static=True).double()
    torch.manual_seed(0)
    x, modality = torch.randn(3, 7, 16, dtype=torch.float64), torch.randint(0, 2, (3, 7))
    a, b = dynamic(x, modality), static(x, modality)
    torch.testing.assert_close(a.output, b.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-12, atol=1e-14)
