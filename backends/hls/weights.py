"""Weights of the PyTorch model in the layouts of the generated project (see model.Weight)."""

from __future__ import annotations

import torch
from moec.backends import BackendError
from moec.backends.pytorch.codegen import py_name

from .model import Project, Weight


def _absmean(w: torch.Tensor, stacked: bool) -> torch.Tensor:
    """The ternary scale of moec's PyTorch runtime (`ternarize`): mean |w| per expert matrix."""
    dims = (1, 2) if stacked else (0, 1)
    return w.abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)


def _codes(w: torch.Tensor, stacked: bool) -> torch.Tensor:
    return torch.clamp(torch.round(w / _absmean(w, stacked)), -1, 1)


def state_key(name: str) -> str:
    """The PyTorch state-dict key of an IR parameter name `layers.<i>.<path>`: the path's names as the
    PyTorch target spells them (`py_name`: e.g. a group named `class` becomes `class_`)."""
    parts = name.split(".")
    return ".".join(parts[:2] + [py_name(p) for p in parts[2:]]) if parts[0] == "layers" else name


def _array(w: Weight, state: dict[str, torch.Tensor]) -> torch.Tensor:
    def get(name: str) -> torch.Tensor:
        key = state_key(name)
        if key not in state:
            raise BackendError(f"the PyTorch model has no parameter `{key}` (internal naming mismatch)")
        return state[key].detach().to(torch.float32).cpu()

    if w.layout == "scales":
        mats = [get(k) if k else None for k in w.keys]
        e = next(m for m in mats if m is not None)
        stacked = e.dim() == 3
        n = e.shape[0] if stacked else 1
        cols = [(_absmean(m, stacked).reshape(n) if m is not None else torch.zeros(n)) for m in mats]
        return torch.stack(cols, dim=1).reshape(-1)
    t = get(w.keys[0])
    if w.layout == "linear":
        t = t.t()
    elif w.layout == "ternary_linear":
        t = _codes(t, False).t()
    elif w.layout == "ternary_stacked":
        t = _codes(t, True)
    return t.contiguous().reshape(-1)


def export(project: Project, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cname -> flat float32 array for every weight of `project`, from a PyTorch state_dict."""
    out = {}
    for w in project.weights:
        a = _array(w, state)
        if a.numel() != w.size:
            raise BackendError(f"parameter `{w.keys[0]}` has {a.numel()} entries, the project expects {w.size}")
        out[w.cname] = a
    return out


def as_text(values: torch.Tensor, integer: bool, sep: str = "\n") -> str:
    if integer:
        return sep.join(str(int(v)) for v in values.to(torch.int64).tolist())
    return sep.join(f"{v:.9g}" for v in values.tolist())
