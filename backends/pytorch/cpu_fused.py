"""moec fused CPU kernels: the SwiGLU epilogue of the split expert path, RMSNorm and router top-k,
in one pass per row.

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
* ``top_k_indices(scores, k)`` -> ``ids`` [n, k]: the k largest entries of each row in
  descending order, ties to the lower index (the tie rule of every moec target), one pass per row;
* ``rms_norm_forward(x, weight, eps)`` -> ``(y, rstd)``, ``y = x * rstd * weight`` with
  ``rstd = 1 / sqrt(mean(x^2) + eps)`` per row; ``rms_norm_backward(grad, x, weight, rstd, need_x,
  need_weight)`` -> ``(dx, dweight)``: one read of ``x`` (and ``grad``) per direction where the
  torch ops make three to five passes. Sums of squares, dot products and the weight gradient
  accumulate in double precision.

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
#include <string.h>

/* silu(x) = x s with s = 1 / (1 + e), e = exp(-x) (argument clamped: e stays finite);
   silu'(x) = s (1 + x (1 - s)) = s (1 + x e s), with x clamped as exp's argument: -ffast-math may
   form x e first, which overflows far in the negative tail, where silu' is 0 to working precision */
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
            const T x = gi[j], uj = ui[j], d = di[j], xc = -MIN(-x, MAXARG);                      \
            const T e = EXP(-xc), s = (T)1 / ((T)1 + e);                                          \
            const T a = x * s, h = a * uj, dh = d * wi;                                           \
            acc += d * h;                                                                         \
            di[j] = h * hw;                                                                       \
            ui[j] = dh * a;                                                                       \
            gi[j] = dh * uj * s * ((T)1 + xc * (e * s)); /* 1 - s = e s: exact where s rounds to 1 */ \
        }                                                                                         \
        if (dw) dw[i] = acc;                                                                      \
    }                                                                                             \
}

DEFINE_SWIGLU(float, f32, expf, fminf, 80.0f)
DEFINE_SWIGLU(double, f64, exp, fmin, 700.0)

#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM omp_get_thread_num()
#else
#define THREAD_NUM 0
#endif

/* y = x r w per row, r = 1 / sqrt(mean(x^2) + eps), stored in rstd */
#define DEFINE_RMS_NORM(T, SUFFIX)                                                                   \
void rms_norm_forward_##SUFFIX(const T *x, const T *w, T *y, T *rstd, int64_t n, int64_t d,       \
                               double eps, int threads) {                                         \
    _Pragma("omp parallel for num_threads(threads) if(n * d >= 32768) schedule(static)")          \
    for (int64_t i = 0; i < n; i++) {                                                             \
        const T *xi = x + i * d;                                                                  \
        T *yi = y + i * d;                                                                        \
        double ss = 0;                                                                            \
        for (int64_t j = 0; j < d; j++) ss += (double)xi[j] * xi[j];                              \
        const T r = (T)(1.0 / sqrt(ss / (double)d + eps));                                        \
        rstd[i] = r;                                                                              \
        for (int64_t j = 0; j < d; j++) yi[j] = xi[j] * r * w[j];                                 \
    }                                                                                             \
}                                                                                                 \
/* dx = r (g w - x r^2 <g w, x> / d); dw = sum over rows of g x r, one partial sum per thread     \
   in dw_part [threads, d] (zeroed by the caller). dx or dw_part may be NULL. */                  \
void rms_norm_backward_##SUFFIX(const T *g, const T *x, const T *w, const T *rstd, T *dx,         \
                                double *dw_part, int64_t n, int64_t d, int threads) {             \
    _Pragma("omp parallel num_threads(threads) if(n * d >= 32768)")                               \
    {                                                                                             \
        double *dw = dw_part ? dw_part + (int64_t)THREAD_NUM * d : 0;                             \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t i = 0; i < n; i++) {                                                         \
            const T *gi = g + i * d, *xi = x + i * d;                                             \
            const T r = rstd[i];                                                                  \
            if (dw)                                                                               \
                for (int64_t j = 0; j < d; j++) dw[j] += (double)(gi[j] * xi[j] * r);             \
            if (dx) {                                                                             \
                T *di = dx + i * d;                                                               \
                double dot = 0;                                                                   \
                for (int64_t j = 0; j < d; j++) dot += (double)(gi[j] * w[j]) * xi[j];            \
                const T c = (T)((double)r * r * r * dot / (double)d);                             \
                for (int64_t j = 0; j < d; j++) di[j] = r * (gi[j] * w[j]) - xi[j] * c;           \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_RMS_NORM(float, f32)
DEFINE_RMS_NORM(double, f64)

/* Order-preserving integer keys of floats (-0 and +0 equal): comparisons stay exact whatever
   -ffast-math assumes about infinities. */
static inline int32_t key_f32(float v) {
    int32_t b;
    memcpy(&b, &v, sizeof b);
    if (b == INT32_MIN) b = 0;
    return b < 0 ? b ^ INT32_MAX : b;
}
static inline int64_t key_f64(double v) {
    int64_t b;
    memcpy(&b, &v, sizeof b);
    if (b == INT64_MIN) b = 0;
    return b < 0 ? b ^ INT64_MAX : b;
}

/* ids [n, k] of the k largest entries of each row of s [n, e], in descending order, ties to the
   lower index: one pass over the row, inserting into the sorted best k. */
#define DEFINE_TOP_K(T, SUFFIX, KEY_T)                                                               \
void top_k_##SUFFIX(const T *s, int64_t *ids, int64_t n, int64_t e, int64_t k, int threads) {     \
    if (k <= 0) return;                                                                           \
    _Pragma("omp parallel for num_threads(threads) if(n * e >= 16384) schedule(static)")          \
    for (int64_t i = 0; i < n; i++) {                                                             \
        const T *si = s + i * e;                                                                  \
        int64_t *oi = ids + i * k, m = 0;                                                         \
        KEY_T best[k];                                                                            \
        for (int64_t j = 0; j < e; j++) {                                                         \
            const KEY_T v = key_##SUFFIX(si[j]);                                                  \
            if (m == k && v <= best[k - 1]) continue;                                             \
            int64_t p = m < k ? m++ : k - 1;                                                      \
            for (; p > 0 && best[p - 1] < v; p--) {                                               \
                best[p] = best[p - 1];                                                            \
                oi[p] = oi[p - 1];                                                                \
            }                                                                                     \
            best[p] = v;                                                                          \
            oi[p] = j;                                                                            \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_TOP_K(float, f32, int32_t)
DEFINE_TOP_K(double, f64, int64_t)
"""

_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")
# tried in order, the first that builds wins: 512-bit vectors where the CPU has them (x86 only), OpenMP
_OPTIONAL_FLAGS = (("-mprefer-vector-width=512", "-fopenmp"), ("-fopenmp",), ())
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_kernels: dict[str, Callable] = {}  # "swiglu_forward_f32" etc. -> the C function, once loaded
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
    _kernels["swiglu_forward_" + _DTYPES[g.dtype]](g.data_ptr(), u.data_ptr(), None if w is None else w.data_ptr(),
                                             h.data_ptr(), n, f, weighted and w is not None,
                                             torch.get_num_threads())
    return h


def swiglu_backward_(dhw: Tensor, g: Tensor, u: Tensor, w: Tensor | None = None, dw: Tensor | None = None,
                     weighted: bool = False) -> None:
    """In place: ``dhw`` <- h * w (``weighted``) or h, ``u`` <- du, ``g`` <- dg, ``dw[i]`` <- <dhw_i, h_i>.
    Contiguous CPU tensors of one dtype for which ``available`` is True; ``w`` [n, 1] and ``dw``
    [n] or None (no routing weight: w = 1)."""
    n, f = g.shape
    _kernels["swiglu_backward_" + _DTYPES[g.dtype]](dhw.data_ptr(), g.data_ptr(), u.data_ptr(),
                                              None if w is None else w.data_ptr(),
                                              None if dw is None else dw.data_ptr(), n, f,
                                              weighted and w is not None, torch.get_num_threads())


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(``x * rstd * weight``, ``rstd`` [n, 1]) for the rows of a contiguous 2-D CPU tensor ``x``
    and a contiguous ``weight`` [d] of its dtype, for which ``available`` is True."""
    n, d = x.shape
    y, rstd = torch.empty_like(x), x.new_empty(n, 1)
    _kernels["rms_norm_forward_" + _DTYPES[x.dtype]](x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                                      n, d, eps, torch.get_num_threads())
    return y, rstd


def rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, need_x: bool = True,
                      need_weight: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Gradients (of ``x``, of ``weight``; None where not needed) of ``rms_norm_forward``'s output,
    given ``grad`` of it and its ``rstd``. Contiguous CPU tensors of one dtype."""
    n, d = x.shape
    threads = torch.get_num_threads()
    dx = torch.empty_like(x) if need_x else None
    partial = torch.zeros(threads, d, dtype=torch.float64) if need_weight else None
    _kernels["rms_norm_backward_" + _DTYPES[x.dtype]](
        grad.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), None if dx is None else dx.data_ptr(),
        None if partial is None else partial.data_ptr(), n, d, threads)
    return dx, None if partial is None else partial.sum(0).to(x.dtype)


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices [n, k] (int64) of the k largest entries of each row of a 2-D CPU tensor, in
    descending order, ties to the lower index (-0.0 ties +0.0; NaN ranks above +inf)."""
    scores = scores.detach().contiguous()
    n, e = scores.shape
    ids = torch.empty(n, k, dtype=torch.int64)
    _kernels["top_k_" + _DTYPES[scores.dtype]](scores.data_ptr(), ids.data_ptr(), n, e, k, torch.get_num_threads())
    return ids


def _load() -> None:
    global _status
    with _lock:
        if _status is None:
            _status = _build()


def _build() -> str:
    """Compile (or find in the cache) and load the library; fills ``_kernels``. Returns the status."""
    if os.environ.get("MOEC_CPU_KERNELS", "1") == "0":
        return "disabled by MOEC_CPU_KERNELS=0; the fused CPU kernels run as torch ops"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler found ($CC, cc, gcc); the fused CPU kernels run as torch ops"
    reason = ""
    for optional in _OPTIONAL_FLAGS:
        try:
            path = _cache_dir() / f"cpu_fused_{_key(compiler, optional)}.so"
            if not path.exists():
                _compile(compiler, optional, path)
            library = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # RuntimeError: no home directory
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            continue
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        signatures = {"swiglu_forward": [p] * 4 + [i64, i64, i32, i32],
                      "swiglu_backward": [p] * 5 + [i64, i64, i32, i32],
                      "rms_norm_forward": [p] * 4 + [i64, i64, f64, i32],
                      "rms_norm_backward": [p] * 6 + [i64, i64, i32],
                      "top_k": [p] * 2 + [i64, i64, i64, i32]}
        for name, argtypes in signatures.items():
            for suffix in _DTYPES.values():
                fn = getattr(library, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                _kernels[f"{name}_{suffix}"] = fn
        return f"compiled with {compiler} {' '.join(optional)}: {path}"
    return f"compiling with {compiler} failed ({reason}); the fused CPU kernels run as torch ops"


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
        src, obj, lib = (os.path.join(tmp, name) for name in ("cpu_fused.c", "cpu_fused.o", "cpu_fused.so"))
        Path(src).write_text(_SOURCE)
        try:
            for command in ([compiler, *_COMPILE_FLAGS, *optional, "-c", src, "-o", obj],
                            [compiler, "-shared", *optional, obj, "-o", lib, "-lm"]):
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as err:
            raise subprocess.SubprocessError((err.stderr or "").strip() or f"exit status {err.returncode}") from None
        os.replace(lib, path)
