"""C simulation: build the generated project with g++ into a shared library, run it through its
``extern "C"`` bridge and compare with the PyTorch backend.

Builds are cached by content: the project files, the compiler and the header directory hash to
``<moec cache>/hls/<digest>/``, so a repeated run loads the library without compiling.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import torch
from moec.backends import BackendError, write_tree

from . import sample as S
from .model import Project
from .precision import HlsConfig
from .weights import state_key

INSTALL_HINT = "pip install --no-deps hls4ml==1.3.0"
HEADERS_ENV = "MOEC_AP_TYPES"


class HlsToolError(BackendError):
    """g++ or the ap_types headers are missing, or the build failed."""


def ap_types_dir() -> str:
    """The ap_types include directory: $MOEC_AP_TYPES, else the one inside the installed hls4ml wheel
    (found without importing hls4ml)."""
    env = os.environ.get(HEADERS_ENV)
    if env:
        if not os.path.isfile(os.path.join(env, "ap_fixed.h")):
            raise HlsToolError(f"{HEADERS_ENV}={env} holds no ap_fixed.h")
        return env
    spec = importlib.util.find_spec("hls4ml")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "templates", "vivado", "ap_types")
        if os.path.isfile(os.path.join(path, "ap_fixed.h")):
            return path
    raise HlsToolError("C simulation needs the ap_types headers, which ship in the hls4ml wheel; install them with: "
                       f"{INSTALL_HINT}  (or set {HEADERS_ENV} to a directory holding ap_fixed.h)")


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise HlsToolError(f"C simulation needs a C++ compiler; `{cxx}` was not found (install g++ or set CXX)")
    return path


def available() -> bool:
    try:
        ap_types_dir()
        compiler()
    except HlsToolError:
        return False
    return True


@dataclass
class Library:
    """A built C-simulation library of one project."""

    path: str
    directory: str
    project: Project
    build_seconds: float
    cached: bool
    compiler_output: str = ""  # g++'s messages (empty: warnings-clean)
    _lib: ctypes.CDLL = field(repr=False, default=None)

    def __post_init__(self):
        lib = ctypes.CDLL(os.path.join(self.directory, f"lib{self.project.name}.so"))
        f, i, c = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int), ctypes.c_char_p
        lib.moec_run.argtypes = [f, i, i, ctypes.c_int, f]
        lib.moec_run.restype = ctypes.c_int
        lib.moec_load_weights.argtypes = [c]
        lib.moec_load_weights.restype = ctypes.c_int
        self._lib = lib
        if lib.moec_load_weights(os.path.join(self.directory, "firmware", "weights").encode()) != 0:
            raise HlsToolError(f"the C simulation could not read its weights in {self.directory}")

    def run(self, x: torch.Tensor, modality: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One sequence: x [T, dim] (T <= max_tokens) -> (y [T, dim], tokens with out-of-range routing ids)."""
        n, dim = x.shape
        if not 1 <= n <= self.project.config.max_tokens:
            raise BackendError(f"the HLS project takes 1..{self.project.config.max_tokens} tokens per sequence "
                               f"(target hls max_tokens), got {n}")
        if dim != self.project.dim:
            raise BackendError(f"input width {dim} does not match the model's {self.project.dim}")
        xs = x.detach().to(torch.float32).contiguous()
        mod = modality.to(torch.int32).contiguous()
        tsk = task.to(torch.int32).contiguous()
        y = torch.zeros_like(xs)
        fp, ip = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int)
        bad = self._lib.moec_run(ctypes.cast(xs.data_ptr(), fp), ctypes.cast(mod.data_ptr(), ip),
                                 ctypes.cast(tsk.data_ptr(), ip), n, ctypes.cast(y.data_ptr(), fp))
        if bad < 0:
            raise HlsToolError("the C simulation rejected the input")
        return y, bad


def build(project: Project, files: dict[str, str]) -> Library:
    """Write and compile `files` (cached by content) and load the library."""
    from moec.api import cache_dir

    headers, cxx = ap_types_dir(), compiler()
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode() + b"\0")
    h.update(headers.encode() + cxx.encode())
    directory = os.path.join(cache_dir(), "hls", h.hexdigest()[:20])
    lib = os.path.join(directory, f"lib{project.name}.so")
    log = os.path.join(directory, "build.log")
    if os.path.exists(lib):
        with open(log) if os.path.exists(log) else open(os.devnull) as fh:
            return Library(lib, directory, project, 0.0, True, fh.read())
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    start = time.perf_counter()
    # build in a private directory, then publish: concurrent builds of one project never mix objects
    with tempfile.TemporaryDirectory(prefix=".build-", dir=os.path.dirname(directory)) as tmp:
        write_tree(tmp, files)
        env = dict(os.environ, MOEC_AP_TYPES=headers, CXX=cxx)
        done = subprocess.run(["bash", os.path.join(tmp, "build_lib.sh")], cwd=tmp, env=env, check=False,
                              capture_output=True, text=True)
        built = os.path.join(tmp, os.path.basename(lib))
        if done.returncode != 0 or not os.path.exists(built):
            raise HlsToolError(f"g++ failed to build the C simulation of `{project.name}`:\n"
                               + (done.stderr or done.stdout)[-4000:])
        output = done.stdout + done.stderr
        write_tree(directory, {**files, "build.log": output})
        os.replace(built, lib)
    return Library(lib, directory, project, time.perf_counter() - start, False, output)


INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
TIE_LSBS = 8  # router scores this many activation LSBs apart may swap under fixed-point rounding


@dataclass
class CsimResult:
    output: torch.Tensor  # [B, T, dim] from the C simulation
    reference: torch.Tensor  # the same from PyTorch
    max_abs: float  # over the tokens not near a routing tie
    max_rel: float  # max_abs / max |reference|
    tolerance: float
    bad_routes: int
    warnings: list[str]
    build_seconds: float
    cached: bool
    compiler_output: str = ""
    near_tie: torch.Tensor | None = None  # [B, T] bool: tokens a near-tie routing choice may reach
    tie_margin: float = 0.0
    near_tie_max_abs: float = 0.0  # max abs error over those tokens

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance and self.bad_routes == 0

    def summary(self) -> str:
        build = "cached build" if self.cached else f"built in {self.build_seconds:.1f} s"
        ties = 0 if self.near_tie is None else int(self.near_tie.sum())
        scope = f", over the {self.output.shape[0] * self.output.shape[1] - ties} tokens not near a routing tie" * bool(ties)
        lines = [*(f"warning: {w}" for w in self.warnings),
                 f"C simulation vs PyTorch over {self.output.shape[0]} x {self.output.shape[1]} tokens ({build}):",
                 (f"  max abs error {self.max_abs:.3e}, max rel error {self.max_rel:.3e} (abs / max |PyTorch|){scope}, "
                 f"tolerance {self.tolerance:.3e}: {'ok' if self.ok else 'EXCEEDED'}")]
        if ties:
            lines.append(f"  {ties} tokens are reached by a router choice whose k-th and next scores lie within "
                         f"{self.tie_margin:.2e} ({TIE_LSBS} activation LSBs), where fixed-point rounding may pick the "
                         f"other expert: their max abs error {self.near_tie_max_abs:.3e} "
                         f"({'within' if self.near_tie_max_abs <= self.tolerance else 'beyond'} the tolerance)")
        if self.bad_routes:
            lines.append(f"  {self.bad_routes} tokens had routing ids outside their expert range")
        return "\n".join(lines)


def tolerance(config: HlsConfig, layers: int) -> float:
    """Largest expected |C-sim - PyTorch| on outputs of unit scale: every rounding of an activation costs
    half an activation LSB and a weight rounding a relative half weight LSB, both amplified through
    the linear layers of a block (about 16x, measured) and accumulated over the blocks."""
    per_block = 16 * (config.activations.lsb + config.weights.lsb)
    return per_block * max(1, layers) + 4 * config.activations.lsb


def near_ties(model, graph, example: dict, margin: float) -> torch.Tensor:
    """[T] bool: the tokens of one sequence that a near-tie router choice can reach. A token is near
    a tie when its router's k-th and (k+1)-th logits (softmax and sigmoid keep their order) lie
    within `margin`; the choice then reaches the token itself, and through a later attention
    sublayer the later tokens of the sequence (all of them if that attention is not causal)."""
    T = example["x"].shape[0]
    tied = torch.zeros(T, dtype=torch.bool)
    routers = {graph.op(n).name: graph.op(n) for n in graph.nodes() if graph.op(n).kind == "router"}
    groups = {graph.op(n).name.rsplit(".", 1)[0]: graph.op(n).modalities for n in graph.nodes()
              if graph.op(n).kind == "select_tokens"}
    first = {}  # layer -> earliest near-tie token

    def hook(name, op):
        def record(_module, _inputs, logits):
            k = op.router.k
            if logits.shape[-1] <= k or not logits.numel():
                return
            top = logits.detach().topk(k + 1, dim=-1).values
            close = (top[:, k - 1] - top[:, k]) <= margin
            modalities = groups.get(name.rsplit(".", 1)[0])
            rows = torch.arange(T) if modalities is None else torch.nonzero(
                torch.isin(example["modality"], torch.tensor(modalities))).squeeze(1)
            hit = rows[close]
            if hit.numel():
                tied[hit] = True
                layer = int(name.split(".")[1])
                first[layer] = min(first.get(layer, T), int(hit.min()))
        return record

    handles = [model.get_submodule(state_key(name)).register_forward_hook(hook(name, op))
               for name, op in routers.items()]
    try:
        S.reference(model, example)
    finally:
        for h in handles:
            h.remove()
    attention = [(graph.op(n).layer, graph.op(n).causal) for n in graph.nodes() if graph.op(n).kind == "attention"]
    for layer, t in first.items():
        later = [causal for at, causal in attention if at is not None and at > layer]
        if later:
            tied[t if all(later) else 0:] = True
    return tied


def calibrate(model, example: dict, config: HlsConfig) -> list[str]:
    """Run PyTorch on the inputs, recording the largest |value| every module outputs and every weight
    holds; warn where the declared types cannot represent them."""
    peaks: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, output):
            out = getattr(output, "output", output)
            if isinstance(out, tuple):
                out = out[0]
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                peaks[name] = max(peaks.get(name, 0.0), float(out.detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        S.reference(model, example)
    finally:
        for h in handles:
            h.remove()
    peaks["input"] = float(example["x"].abs().max()) if example["x"].numel() else 0.0
    warnings = []
    act = config.activations
    for name, peak in sorted(peaks.items(), key=lambda kv: -kv[1]):
        if peak > act.max:
            warnings.append(f"`{name}` reaches |{peak:.4g}| but activations {act} hold at most {act.max:.4g}: "
                            f"values will {'saturate' if act.overflow == 'saturate' else 'wrap around'}")
    wmax = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
    if wmax > config.weights.max:
        warnings.append(f"weights reach |{wmax:.4g}| but weights {config.weights} hold at most "
                        f"{config.weights.max:.4g}")
    return warnings


def run(path: str, x: torch.Tensor | None = None, modality: torch.Tensor | None = None,
        task: torch.Tensor | None = None, seed: int = 0, tokens: int | None = None) -> CsimResult:
    """C-simulate `path` (weights of ``moec.load(path, seed=seed)``) on x [T, dim] or [B, T, dim]
    (default: random N(0, 1) tokens) and compare with the PyTorch backend."""
    import moec
    from moec.driver import compile_model

    from . import files_for

    comp = compile_model(path)
    model = moec.load(path, seed=seed).eval()
    project, files = files_for(comp, seed=seed, model=model)
    cfg = project.config
    if x is None:
        n = tokens or min(16, cfg.max_tokens)
        x = S.example_inputs(project, comp, tokens=n, seed=seed)["x"]
    x = torch.as_tensor(x)
    if x.is_complex():
        raise BackendError(f"input is complex ({x.dtype}); the C simulation takes real numbers")
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in INTEGER_DTYPES):
        raise BackendError(f"input must hold real numbers, got {x.dtype}")
    if x.is_floating_point() and bool(torch.isfinite(x).all()) and x.numel():
        peak = float(x.abs().max())
        if peak > torch.finfo(torch.float32).max:
            raise BackendError(f"input reaches |{peak:.4g}|, beyond float32's range; the C simulation reads float32")
    x = x.to(torch.float32)
    if x.dim() not in (2, 3) or x.shape[-1] != project.dim:
        raise BackendError(f"input must be [T, {project.dim}] or [B, T, {project.dim}], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise BackendError("input has NaN or infinite values; the fixed-point project cannot represent them")
    if x.shape[:-1].numel() == 0:
        raise BackendError(f"input has no tokens (shape {tuple(x.shape)}); give at least one token")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    b, t = x.shape[:2]
    tasks = S.task_count(project)
    if task is not None and tasks is None:
        raise BackendError(f"`{project.name}` does not route by task, so task ids (--task) do not apply; task ids "
                           "are for models with `router deterministic(by = task)`")
    carried = [project.modalities.index(m) for m in comp.spec.input_modalities]
    if modality is None:
        modality = torch.tensor([carried[i % len(carried)] for i in range(t)]).expand(b, t)
    if task is None:
        task = (torch.arange(t) % (tasks or 1)).expand(b, t)
    modality, task = torch.as_tensor(modality), torch.as_tensor(task)
    for name, ids in (("modality", modality), ("task", task)):
        if ids.numel() != b * t or ids.is_floating_point():
            raise BackendError(f"{name} ids must be integers of shape [{t}] or [{b}, {t}] like the input, "
                               f"got {ids.dtype} {tuple(ids.shape)}")
    modality, task = modality.reshape(b, t).to(torch.int64), task.reshape(b, t).to(torch.int64)
    if bool(((modality < 0) | (modality >= len(project.modalities))).any()):
        raise BackendError(f"modality ids must lie in [0, {len(project.modalities)})")
    if tasks is not None and bool(((task < 0) | (task >= tasks)).any()):
        raise BackendError(f"task ids must lie in [0, {tasks}) (one expert per task), got ids in "
                           f"[{int(task.min())}, {int(task.max())}]")
    library = build(project, files)
    margin = TIE_LSBS * cfg.activations.lsb
    outs, refs, ties, bad, warnings = [], [], [], 0, []
    for i in range(b):
        example = {"x": x[i], "modality": modality[i], "task": task[i]}
        y, n_bad = library.run(x[i], modality[i], task[i])
        outs.append(y)
        bad += n_bad
        refs.append(S.reference(model, example) if n_bad == 0 else torch.full_like(y, float("nan")))
        ties.append(near_ties(model, comp.graph, example, margin))
        for w in calibrate(model, example, cfg):
            if w not in warnings:
                warnings.append(w)
    out, ref, tied = torch.stack(outs), torch.stack(refs), torch.stack(ties)
    err = (out - ref).abs().amax(-1) if out.numel() else torch.zeros(b, t)  # [B, T]
    free = err[~tied]
    max_abs = float("inf") if bad else float(free.max()) if free.numel() else 0.0
    scale = float(ref.abs().max()) if not bad and ref.numel() else 1.0
    return CsimResult(out, ref, max_abs, max_abs / max(scale, 1e-30), tolerance(cfg, len(comp.spec.layers)), bad,
                      warnings, library.build_seconds, library.cached, library.compiler_output, near_tie=tied,
                      tie_margin=margin, near_tie_max_abs=float(err[tied].max()) if bool(tied.any()) else 0.0)
