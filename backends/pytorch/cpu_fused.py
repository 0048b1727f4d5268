"""moec fused CPU kernels: the SwiGLU epilogue of the split expert path in one pass per row.

This file is copied verbatim next to generated model code as ``moec_cpu_fused.py``, beside
``moec_runtime.py`` (which calls it). It depends only on ``torch`` and the standard library.

The eager split path spends a good part of its non-GEMM time in elementwise passes over each
expert's [n, f] hidden rows (silu, products with u and the routing weight, the routing weight's
gradient, silu's derivative) and in dispatching them, one torch op each. Here each direction is
one C loop over the rows:

* ``swiglu_forward(g, u, w, weighted)`` -> ``h = silu(g) * u``, times the row's routing weight
  ``w`` if ``weighted``;
* ``swiglu_backward_(dhw, g, u, w, dw, weighted)``, given ``dhw = dy @ down^T``, writes in place
  ``dhw <- h * w`` (``weighted``) or ``h``, ``u <- du``, ``g <- dg`` and ``dw[i] = <dhw_i, h_i>``
  (``dw`` may be None), where ``du = dhw * w * silu(g)`` and ``dg = dhw * w * u * silu'(g)``.
  Without routing weights (a dense FFN) ``w`` is None: w = 1.

The C source below is compiled on first use with the system C compiler (``$CC``, else ``cc`` or
``gcc``) for the running CPU (``-O3 -march=native``; ``-ffast-math`` at compile time only, so that
``expf`` and the row sums vectorise, and not at link time, so that loading the library leaves the
process's floating-point mode alone) and cached in ``$MOEC_CACHE/kernels`` (default
``~/.cache/moec/kernels``) under a hash of the source, the flags, the compiler and the CPU. Without a
compiler, or with ``MOEC_CPU_KERNELS=0``, ``available()`` is False and the runtime runs the same
arithmetic as separate torch ops. ``status()`` says which, and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* silu(x) = x s with s = 1 / (1 + e), e = exp(-x) (argument clamped: e stays finite);
   silu'(x) = s (1 + x (1 - s)) = s (1 + x e s) */
#define DEFINE_SWIGLU(T, SUFFIX, EXP, MIN, MAXARG)                                                   \
void swiglu_forward_##SUFFIX(const T *g, const T *u, const T *w, T *h, int64_t n, int64_t f,     \
                             int weighted, int threads) {                                         \
    _Pragma("omp parallel for num_threads(threads) if(n * f >= 16384) schedule(static)")          \
    for (int64_t i = 0; i < n; i++) {                                                             \
        const T *gi = g + i * f, *ui = u + i * f;                                                 \
        T *hi = h + i * f;                                                                        \
        const T wi = weighted ? w[i] : (T)1;                                                      \
        for (int64_t j = 0; j < f; j++) {                                                         \
            const T x = gi[j];                                                                    \
            const T s = (T)1 / ((T)1 + EXP(MIN(-x, MAXARG)));                                    \
            hi[j] = x * s * ui[j] * wi;                                                           \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void swiglu_backward_##SUFFIX(T *dhw, T *g, T *u, const T *w, T *dw, int64_t n, int64_t f,       \
                              int weighted, int threads) {                                        \
    _Pragma("omp parallel for num_threads(threads) if(n * f >= 16384) schedule(static)")          \
    for (int64_t i = 0; i < n; i++) {                                                             \
        T *di = dhw + i * f, *gi = g + i * f, *ui = u + i * f;                                    \
        const T wi = w ? w[i] : (T)1, hw = weighted ? wi : (T)1;                                  \
        T acc = 0;                                                                                \
        for (int64_t j = 0; j < f; j++) {                                                         \
            const T x = gi[j], uj = ui[j], d = di[j];                                             \
            const T e = EXP(MIN(-x, MAXARG)), s = (T)1 / ((T)1 + e);                              \
            const T a = x * s, h = a * uj, dh = d * wi;                                           \
            acc += d * h;                                                                         \
            di[j] = h * hw;                                                                       \
            ui[j] = dh * a;                                                                       \
            gi[j] = dh * uj * s * ((T)1 + x * (e * s)); /* 1 - s = e s: exact where s rounds to 1 */ \
        }                                                                                         \
        if (dw) dw[i] = acc;                                                                      \
    }                                                                                             \
}

DEFINE_SWIGLU(float, f32, expf, fminf, 80.0f)
DEFINE_SWIGLU(double, f64, exp, fmin, 700.0)
"""

_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")
# tried in order, the first that builds wins: 512-bit vectors where the CPU has them (x86 only), OpenMP
_OPTIONAL_FLAGS = (("-mprefer-vector-width=512", "-fopenmp"), ("-fopenmp",), ())
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_kernels: dict[str, Callable] = {}  # "forward_f32" etc. -> the C function, once loaded
_status: str | None = None  # None: not tried yet


def available(dtype: torch.dtype) -> bool:
    """True if the compiled kernels can run on CPU tensors of ``dtype`` (compiles on first call)."""
    if _status is None:
        _load()
    return dtype in _DTYPES and bool(_kernels)


def status() -> str:
    """How the kernels stand: compiled and where, or why the runtime uses plain torch ops."""
    _load()
    return _status


def swiglu_forward(g: Tensor, u: Tensor, w: Tensor | None = None, weighted: bool = False) -> Tensor:
    """``silu(g) * u`` (times ``w`` [n, 1] per row if ``weighted``) as a new [n, f] tensor.
    Contiguous CPU tensors of one dtype for which ``available`` is True."""
    n, f = g.shape
    h = torch.empty_like(g)
    _kernels["forward_" + _DTYPES[g.dtype]](g.data_ptr(), u.data_ptr(), None if w is None else w.data_ptr(),
                                             h.data_ptr(), n, f, weighted and w is not None,
                                             torch.get_num_threads())
    return h


def swiglu_backward_(dhw: Tensor, g: Tensor, u: Tensor, w: Tensor | None = None, dw: Tensor | None = None,
                     weighted: bool = False) -> None:
    """In place: ``dhw`` <- h * w (``weighted``) or h, ``u`` <- du, ``g`` <- dg, ``dw[i]`` <- <dhw_i, h_i>.
    Contiguous CPU tensors of one dtype for which ``available`` is True; ``w`` [n, 1] and ``dw``
    [n] or None (no routing weight: w = 1)."""
    n, f = g.shape
    _kernels["backward_" + _DTYPES[g.dtype]](dhw.data_ptr(), g.data_ptr(), u.data_ptr(),
                                              None if w is None else w.data_ptr(),
                                              None if dw is None else dw.data_ptr(), n, f,
                                              weighted and w is not None, torch.get_num_threads())


def _load() -> None:
    global _status
    with _lock:
        if _status is None:
            _status = _build()


def _build() -> str:
    """Compile (or find in the cache) and load the library; fills ``_kernels``. Returns the status."""
    if os.environ.get("MOEC_CPU_KERNELS", "1") == "0":
        return "disabled by MOEC_CPU_KERNELS=0; the expert epilogue runs as torch ops"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler found ($CC, cc, gcc); the expert epilogue runs as torch ops"
    reason = ""
    for optional in _OPTIONAL_FLAGS:
        try:
            path = _cache_dir() / f"swiglu_{_key(compiler, optional)}.so"
            if not path.exists():
                _compile(compiler, optional, path)
            library = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # RuntimeError: no home directory
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            continue
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for direction, pointers in (("forward", 4), ("backward", 5)):
            for suffix in _DTYPES.values():
                fn = getattr(library, f"swiglu_{direction}_{suffix}")
                fn.argtypes, fn.restype = [p] * pointers + [i64, i64, i32, i32], None
                _kernels[f"{direction}_{suffix}"] = fn
        return f"compiled with {compiler} {' '.join(optional)}: {path}"
    return f"compiling with {compiler} failed ({reason}); the expert epilogue runs as torch ops"


def _cache_dir() -> Path:
    return Path(os.environ.get("MOEC_CACHE") or Path.home() / ".cache" / "moec") / "kernels"


def _key(compiler: str, optional: tuple) -> str:
    """Hash of what the library depends on: source, flags, compiler and this CPU (``-march=native``)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu += "".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        cpu += platform.processor()
    text = "\0".join([_SOURCE, *_COMPILE_FLAGS, *optional, os.path.realpath(shutil.which(compiler) or compiler), cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile(compiler: str, optional: tuple, path: Path) -> None:
    """Compile and link in a temporary directory, then move the library into place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, obj, lib = (os.path.join(tmp, name) for name in ("swiglu.c", "swiglu.o", "swiglu.so"))
        Path(src).write_text(_SOURCE)
        try:
            for command in ([compiler, *_COMPILE_FLAGS, *optional, "-c", src, "-o", obj],
                            [compiler, "-shared", *optional, obj, "-o", lib, "-lm"]):
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as err:
            raise subprocess.SubprocessError((err.stderr or "").strip() or f"exit status {err.returncode}") from None
        os.replace(lib, path)
