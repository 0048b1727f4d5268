"""Render a Project (view-model) and its weights into the files of an HLS project."""

from __future__ import annotations

import os

import jinja2
import torch

from .estimate import estimate, format_estimate
from .model import Project, route_type
from .names import c_identifier
from .weights import as_text

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
KERNELS = os.path.join(TEMPLATES, "firmware", "moec_kernels.h")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["cbool"] = lambda v: "true" if v else "false"
    env.filters["cident"] = c_identifier
    return env


def render(project: Project, weights: dict[str, torch.Tensor] | None, sample: dict | None = None) -> dict[str, str]:
    """Relative path -> text of every file of the project. `sample` (x, modality, task, expected)
    becomes the testbench data; without `weights` the weight files are left out (sources only)."""
    env = _env()
    width, integer = route_type(project)
    ctx = {"p": project, "route_width": width, "route_integer": integer}
    name = project.name
    with open(KERNELS) as fh:
        kernels = fh.read()
    files = {
        f"firmware/{name}.cpp": env.get_template("firmware/model.cpp.j2").render(ctx),
        f"firmware/{name}.h": env.get_template("firmware/model.h.j2").render(ctx),
        "firmware/defines.h": env.get_template("firmware/defines.h.j2").render(ctx),
        "firmware/parameters.h": env.get_template("firmware/parameters.h.j2").render(ctx),
        "firmware/moec_kernels.h": kernels,
        f"tb/{name}_tb.cpp": env.get_template("tb/tb.cpp.j2").render(ctx),
        "bridge.cpp": env.get_template("bridge.cpp.j2").render(ctx),
        "build_lib.sh": env.get_template("build_lib.sh.j2").render(ctx),
        "build_prj.tcl": env.get_template("build_prj.tcl.j2").render(ctx),
    }
    weight_h = env.get_template("firmware/weight.h.j2")
    for w in project.weights if weights is not None else ():
        values = weights[w.cname]
        integer_codes = w.ctype == "tern_t"
        files[f"firmware/weights/{w.cname}.txt"] = as_text(values, integer_codes) + "\n"
        inline = "" if w.offchip else as_text(values, integer_codes, ", ")
        files[f"firmware/weights/{w.cname}.h"] = weight_h.render(w=w, values=inline)
    if sample is not None:
        files["tb_data/tb_input.txt"] = _sample_text(sample)
        if sample.get("expected") is not None:
            files["tb_data/tb_expected.txt"] = as_text(sample["expected"].reshape(-1), False, " ") + "\n"
    report = estimate(project)
    files["README.md"] = env.get_template("README.md.j2").render(ctx | {"estimate": format_estimate(report)})
    return files


def _sample_text(sample: dict) -> str:
    x = sample["x"]
    lines = [str(x.shape[0]), as_text(x.reshape(-1), False, " "),
             " ".join(str(int(v)) for v in sample["modality"].tolist()),
             " ".join(str(int(v)) for v in sample["task"].tolist())]
    return "\n".join(lines) + "\n"
