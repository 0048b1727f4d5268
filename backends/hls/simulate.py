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
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from moec.backends import BackendError, write_tree

from . import sample as S
from .model import Project
from .precision import HlsConfig

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
        lib.moec_routes.argtypes = [ctypes.c_int, i, i, ctypes.c_int]
        lib.moec_routes.restype = ctypes.c_int
        lib.moec_accum_peak.argtypes = [ctypes.c_int]
        lib.moec_accum_peak.restype = ctypes.c_double
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

    def routes(self, queue: int) -> dict[int, list[int]]:
        """token -> the experts queue `queue` (the project's queues in order) gave it in the last run."""
        _, experts = self.project.queues[queue]
        capacity = experts * self.project.config.max_tokens
        token, expert = (ctypes.c_int * capacity)(), (ctypes.c_int * capacity)()
        n = self._lib.moec_routes(queue, token, expert, capacity)
        if n < 0:
            raise HlsToolError(f"the C simulation has no routing for queue {queue}")
        chosen: dict[int, list[int]] = {}
        for j in range(n):
            chosen.setdefault(token[j], []).append(expert[j])
        return chosen

    def accum_peak(self, reset: bool = True) -> float:
        """The largest |value| an accumulator was asked to take since the last reset."""
        return float(self._lib.moec_accum_peak(int(reset)))


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
    reference: torch.Tensor  # the same from PyTorch, following the C++'s experts at near ties
    max_abs: float  # over every token
    max_rel: float  # max_abs / max |reference|
    tolerance: float
    bad_routes: int
    warnings: list[str]
    build_seconds: float
    cached: bool
    compiler_output: str = ""
    near_tie: torch.Tensor | None = None  # [B, T] bool: tokens whose router scores sit near a tie
    tie_margin: float = 0.0
    flipped: torch.Tensor | None = None  # [B, T] bool: near-tie tokens the C++ sent to other experts
    own_reference: torch.Tensor | None = None  # PyTorch with its own routing everywhere
    accum_peak: float = 0.0  # the largest |value| a C++ accumulator was asked to take

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance and self.bad_routes == 0

    def summary(self) -> str:
        build = "cached build" if self.cached else f"built in {self.build_seconds:.1f} s"
        b, t = self.output.shape[:2]
        lines = [*(f"warning: {w}" for w in self.warnings),
                 f"C simulation vs PyTorch over {b} x {t} tokens ({build}):",
                 (f"  max abs error {self.max_abs:.3e}, max rel error {self.max_rel:.3e} (abs / max |PyTorch|) over "
                  f"all {b * t} tokens, tolerance {self.tolerance:.3e}: {'ok' if self.ok else 'EXCEEDED'}")]
        ties = 0 if self.near_tie is None else int(self.near_tie.sum())
        flips = 0 if self.flipped is None else int(self.flipped.sum())
        if ties:
            lines.append(f"  {ties} {'token sits' if ties == 1 else 'tokens sit'} near a routing tie (a router's k-th and next scores within "
                         f"{self.tie_margin:.2e}, {TIE_LSBS} activation LSBs), where fixed-point rounding may pick the "
                         f"other expert; the PyTorch reference takes the C++'s experts there ({flips} of them "
                         "differ from PyTorch's own choice), so they are checked too")
        if self.bad_routes:
            lines.append(f"  {self.bad_routes} tokens had routing ids outside their expert range")
        return "\n".join(lines)


def tolerance(config: HlsConfig, layers: int) -> float:
    """Largest expected |C-sim - PyTorch| on outputs of unit scale: every rounding of an activation costs
    half an activation LSB and a weight rounding a relative half weight LSB, both amplified through
    the linear layers of a block (about 16x, measured) and accumulated over the blocks."""
    per_block = 16 * (config.activations.lsb + config.weights.lsb)
    return per_block * max(1, layers) + 4 * config.activations.lsb


def following_routes(model, project: Project, example: dict, chosen: list[dict[int, list[int]]],
                     margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch on one sequence, taking at every learned router the C++'s experts (`chosen[i]`: token
    -> experts of the i-th `route_top_k` step) for the tokens whose k-th and (k+1)-th logits lie within
    `margin` (softmax and sigmoid keep their order), where fixed-point rounding may pick the other
    expert; elsewhere PyTorch routes by itself, so a C++ choice away from a near tie still shows as
    an error. Returns (output [T, dim], near-tie tokens [T], tokens routed differently [T])."""
    module = sys.modules[type(model).__module__]
    original = getattr(module, "route_top_k", None)
    steps = [s for s in project.steps if s.kind == "route_top_k"]
    T = example["x"].shape[0]
    near = torch.zeros(T, dtype=torch.bool)
    flipped = torch.zeros(T, dtype=torch.bool)
    if original is None or not steps:
        return S.reference(model, example), near, flipped
    calls = iter(zip(steps, chosen))

    def route_top_k(logits, k, score="softmax", renormalize=False, scale=1.0, bias=None):
        w, ids, probs = original(logits, k, score=score, renormalize=renormalize, scale=scale, bias=bias)
        step, cpp = next(calls, (None, None))
        E = logits.shape[1]
        if step is None or E != step.args["experts"] or k != step.args["k"] or bias is not None:
            raise HlsToolError("internal error: the PyTorch routers do not match the project's (this is a bug)")
        members = torch.tensor([(step.args["mask"] >> int(m)) & 1 for m in example["modality"]], dtype=torch.bool)
        if logits.shape[0] == T:  # every token scored, the group's kept
            rows = torch.arange(T)
        elif logits.shape[0] == int(members.sum()):  # the group's tokens only
            rows = torch.nonzero(members).squeeze(1)
        else:
            raise HlsToolError("internal error: a router scores rows the project does not know (this is a bug)")
        if k >= E or not logits.numel():
            return w, ids, probs
        z = logits.detach().to(torch.float32)
        top = z.topk(k + 1, dim=-1).values
        close = (top[:, k - 1] - top[:, k]) <= margin
        ids = ids.clone()
        changed = False
        for r in torch.nonzero(close & members[rows]).squeeze(1).tolist():
            t = int(rows[r])
            near[t] = True
            picked = cpp.get(t, [])
            if len(picked) == k and set(picked) != set(ids[r].tolist()):
                order = sorted(picked, key=lambda e: (-float(z[r, e]), e))
                ids[r] = torch.tensor(order, dtype=ids.dtype)
                flipped[t] = changed = True
        if changed:  # route_top_k's weights, at the C++'s experts
            w = probs.gather(-1, ids)
            if renormalize:
                w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0))
            if scale != 1.0:
                w = w * scale
        return w, ids, probs

    module.route_top_k = route_top_k
    try:
        out = S.reference(model, example)
    finally:
        module.route_top_k = original
    if next(calls, None) is not None:
        raise HlsToolError("internal error: the PyTorch model skipped a router of the project (this is a bug)")
    return out, near, flipped


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
    route_queues = [[name for name, _ in project.queues].index(st.args["queue"]) for st in project.steps
                    if st.kind == "route_top_k"]
    outs, refs, owns, ties, flips, bad, warnings, peak = [], [], [], [], [], 0, [], 0.0
    for i in range(b):
        example = {"x": x[i], "modality": modality[i], "task": task[i]}
        library.accum_peak(reset=True)
        y, n_bad = library.run(x[i], modality[i], task[i])
        peak = max(peak, library.accum_peak(reset=True))
        outs.append(y)
        bad += n_bad
        if n_bad == 0:
            chosen = [library.routes(q) for q in route_queues]
            ref, near, flipped = following_routes(model, project, example, chosen, margin)
            own = S.reference(model, example) if bool(flipped.any()) else ref
        else:
            ref = own = torch.full_like(y, float("nan"))
            near = flipped = torch.zeros(t, dtype=torch.bool)
        refs.append(ref)
        owns.append(own)
        ties.append(near)
        flips.append(flipped)
        for w in calibrate(model, example, cfg):
            if w not in warnings:
                warnings.append(w)
    acc = cfg.accumulators
    if peak > acc.max:
        warnings.append(f"sums in the C simulation reach |{peak:.4g}| (at least: a saturated sum stops growing) but "
                        f"accumulators {acc} hold at most {acc.max:.4g}: sums will "
                        f"{'saturate' if acc.overflow == 'saturate' else 'wrap around'}")
    out, ref = torch.stack(outs), torch.stack(refs)
    err = (out - ref).abs().amax(-1) if out.numel() else torch.zeros(b, t)  # [B, T]
    max_abs = float("inf") if bad else float(err.max()) if err.numel() else 0.0
    scale = float(ref.abs().max()) if not bad and ref.numel() else 1.0
    return CsimResult(out, ref, max_abs, max_abs / max(scale, 1e-30), tolerance(cfg, len(comp.spec.layers)), bad,
                      warnings, library.build_seconds, library.cached, library.compiler_output,
                      near_tie=torch.stack(ties), tie_margin=margin, flipped=torch.stack(flips),
                      own_reference=torch.stack(owns), accum_peak=peak)
