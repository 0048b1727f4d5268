"""Sample inputs for a project and the PyTorch reference output on them."""

from __future__ import annotations

import torch

from .model import Project


def task_count(project: Project) -> int | None:
    """Task ids must index experts: the fewest experts of any task-routed group (None: no task routing)."""
    counts = [s.args["experts"] for s in project.steps if s.kind == "route_fixed" and s.args["by"] == "BY_TASK"]
    return min(counts) if counts else None


def example_inputs(project: Project, comp, tokens: int, seed: int = 0) -> dict:
    """x [tokens, dim] ~ N(0, 1); modalities cycling through the input's modalities; tasks cycling
    through the valid task ids."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, project.dim, generator=gen)
    carried = [project.modalities.index(m) for m in comp.spec.input_modalities]
    modality = torch.tensor([carried[t % len(carried)] for t in range(tokens)], dtype=torch.int64)
    tasks = task_count(project) or 1
    task = torch.arange(tokens, dtype=torch.int64) % tasks
    return {"x": x, "modality": modality, "task": task}


def reference(model, example: dict) -> torch.Tensor:
    """The PyTorch model's output [tokens, dim] on one sequence."""
    with torch.no_grad():
        out = model.eval()(example["x"].unsqueeze(0), example["modality"].unsqueeze(0),
                           example["task"].unsqueeze(0))
    return out.output.squeeze(0).to(torch.float32)
