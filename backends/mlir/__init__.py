"""MLIR target: a static-shape moec model -> ``.mlir`` text through torch-mlir's FX importer.

``emit(model, example_inputs, out_path, dialect="linalg-on-tensors")`` runs
``torch_mlir.fx.export_and_import`` (``torch.export`` + FX import + torch-mlir's lowering
pipeline) on ``model`` with ``example_inputs`` and writes the module text to ``out_path``.
The model must be in static-shape form (``moec compile --static``: capacity-padded dispatch
from ``moec_static_runtime``); the dynamic form's ``nonzero`` / ``.tolist()`` stop
``torch.export`` (``GuardOnDataDependentSymNode``).  Parameters are frozen into the module as
constants, shapes are those of ``example_inputs``.

Model outputs are flattened to a tuple of tensors before export (a ``ModelOutput``
dataclass becomes ``(output, aux_loss, *expert_counts)``), so unregistered pytree types
never reach ``torch.export``.

Dialects (user name -> torch-mlir output type): ``linalg`` / ``linalg-on-tensors`` (default)
-> linalg-on-tensors (``linalg``, ``arith``, ``tensor`` and, for ``topk``/``index_copy``,
torch-mlir's ``tm_tensor.sort`` / ``tm_tensor.scatter``); ``stablehlo``; ``tosa``; ``torch``
(torch dialect, backend contract form); ``raw`` (the FX importer's output, unlowered).
With torch 2.13.0 and torch-mlir 20261001 the static moec models lower to all of them.

``emit_compilation(comp, out_dir, dialect=..., batch=1, tokens=8, seed=0)`` is the registry
adapter: it renders the model with the PyTorch backend in static mode, imports it, and
writes ``<model>.mlir``. The exported function takes ``(x [B, T, d], modality [B, T])`` and, for
a model that routes by task, ``task [B, T]`` as well (the generated ``forward(x, modality=None,
task=None)``). Deterministic (modality / task) routing checks its ids on the host in PyTorch; an
exported graph cannot raise, so the export leaves that check out: ids outside ``[0, E)`` are the
caller's to avoid, as with ``route_deterministic(..., validate=False)``.

torch-mlir is optional: ``pip install torch-mlir==20261001`` (or ``pip install
'moec[mlir]'``); without it ``emit`` raises ``MlirUnavailableError`` saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import tempfile
import warnings

INSTALL_HINT = "pip install torch-mlir==20261001  (or: pip install 'moec[mlir]')"

# user-facing name -> torch_mlir OutputType value
DIALECTS: dict[str, str] = {
    "linalg": "linalg-on-tensors",
    "linalg-on-tensors": "linalg-on-tensors",
    "stablehlo": "stablehlo",
    "tosa": "tosa",
    "torch": "torch",
    "raw": "raw",
}

__all__ = ["DIALECTS", "INSTALL_HINT", "MlirLoweringError", "MlirUnavailableError", "available", "emit",
           "emit_compilation", "output_type"]


class MlirUnavailableError(ImportError):
    """torch-mlir is not installed."""


class MlirLoweringError(RuntimeError):
    """torch.export or torch-mlir failed on the model; the message names the dialect and the error."""


def available() -> bool:
    """True if ``torch_mlir.fx`` can be imported."""
    try:
        _import_fx()
    except MlirUnavailableError:
        return False
    return True


def _import_fx():
    try:
        from torch_mlir import fx
    except ImportError as exc:
        raise MlirUnavailableError(
            f"the mlir target needs torch-mlir, which is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return fx


def output_type(dialect: str) -> str:
    """The torch-mlir output type for a user dialect name (``linalg``, ``stablehlo``, ...)."""
    key = dialect.strip().lower().replace("_", "-")
    if key not in DIALECTS:
        raise ValueError(f"unknown MLIR dialect {dialect!r}; expected one of: {', '.join(DIALECTS)}")
    return DIALECTS[key]


def _flat_tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if value is None:
        return []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _flat_tensors(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    raise TypeError(f"mlir.emit: model output of type {type(value).__name__} is not a tensor or a container "
                    "of tensors")


def _flat_module(model):
    from torch import nn

    class FlatOutputs(nn.Module):
        """Wraps a module so that it returns a flat tuple of tensors (export-friendly)."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return tuple(_flat_tensors(self.inner(*args)))

    return FlatOutputs(model)


_ILLEGAL_OP = re.compile(r"failed to legalize operation '([\w.]+)'(?:.*?name = \"([\w.]+)\")?")
_LOCATION = re.compile(r'loc\((?:callsite\()?"([^"]+)":(\d+)')


def _failure(exc: Exception, diagnostics: str) -> str:
    """What went wrong, in one line: the op torch-mlir could not lower and the line of model code
    it comes from (from the MLIR diagnostics it prints), else the first error line of the exception."""
    found = _ILLEGAL_OP.search(diagnostics)
    if found:
        op = (found.group(2) or found.group(1)).removeprefix("torch.")
        where = _LOCATION.search(diagnostics[:found.start()].rsplit("\n", 1)[-1] + diagnostics[found.start():])
        line = ""
        if where and os.path.isfile(where.group(1)):
            with open(where.group(1)) as src:
                lines = src.read().splitlines()
            n = int(where.group(2))
            if 0 < n <= len(lines):
                line = f", from `{lines[n - 1].strip()}` ({os.path.basename(where.group(1))}:{n})"
        return f"torch-mlir has no lowering for `{op}`{line}"
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    return f"{type(exc).__name__}: " + (lines[0] if lines else (text.strip().splitlines() or [""])[0])


@contextlib.contextmanager
def _stderr_captured():
    """Collects what is written to file descriptor 2 (MLIR prints its diagnostics there, from C++)
    into the yielded list's only element."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured = [""]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured[0] = sink.read().decode(errors="replace")


@contextlib.contextmanager
def _buffers_persistent(model):
    """Every buffer of ``model`` persistent while it is exported. torch-mlir freezes buffers from
    the exported program's state dict, which leaves out non-persistent buffers (e.g. a balancing
    router's per-step counts): without this, import fails with "Could not find state mapping for
    buffer". The modules' own settings come back afterwards."""
    saved = [(m, set(m._non_persistent_buffers_set)) for m in model.modules()]
    try:
        for m, _ in saved:
            m._non_persistent_buffers_set.clear()
        yield
    finally:
        for m, names in saved:
            m._non_persistent_buffers_set.update(names)


def lower(model, example_inputs: tuple, dialect: str = "linalg-on-tensors"):
    """Run ``torch_mlir.fx.export_and_import``; return the MLIR module object."""
    import torch

    ot = output_type(dialect)
    fx = _import_fx()
    wrapped = _flat_module(model)
    diagnostics = [""]
    try:
        with (_stderr_captured() as diagnostics, warnings.catch_warnings(), torch.no_grad(),
              _buffers_persistent(wrapped)):
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            module = fx.export_and_import(wrapped, *tuple(example_inputs), output_type=ot)
    except Exception as exc:  # torch.export or torch-mlir pass failures
        raise _lowering_error(ot, exc, diagnostics[0]) from exc
    sys.stderr.write(diagnostics[0])  # the warnings of a lowering that worked are passed on
    return module


def _lowering_error(output_type: str, exc: Exception, diagnostics: str) -> MlirLoweringError:
    if "DataDependent" in type(exc).__name__ or "data-dependent" in str(exc):
        return MlirLoweringError(
            f"lowering to {output_type} failed: torch.export met a shape that depends on the data "
            f"({type(exc).__name__}); the model must be in static-shape form: moec compile --static")
    return MlirLoweringError(f"lowering to {output_type} failed: {_failure(exc, diagnostics)}")


def emit(model, example_inputs: tuple, out_path: str, dialect: str = "linalg-on-tensors") -> str:
    """Lower ``model(*example_inputs)`` to ``dialect`` and write the MLIR text to ``out_path``.

    Returns the text.  The file is written atomically (a temporary sibling, then renamed);
    nothing is written when lowering fails.
    """
    text = str(lower(model, example_inputs, dialect))
    out_path = os.path.abspath(out_path)
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".moec-", suffix=".mlir", dir=parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return text


def example_inputs_for(model, batch: int = 1, tokens: int = 8, seed: int = 0, tasks: int | None = None) -> tuple:
    """``(x [batch, tokens, d_model], modality [batch, tokens])`` for a generated ``Model``:
    random ``x``, modalities cycling through ``Model.modalities`` (values do not change a
    static graph, only shapes do). With ``tasks`` (a model that routes by task: how many task
    ids it takes, ``moec.driver.task_count``) a third tensor ``task [batch, tokens]`` cycling
    through ``0 .. tasks - 1``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, model.d_model, generator=gen)
    n = max(len(getattr(model, "modalities", ())), 1)
    modality = (torch.arange(batch * tokens) % n).reshape(batch, tokens)
    if tasks is None:
        return x, modality
    return x, modality, (torch.arange(batch * tokens) % max(tasks, 1)).reshape(batch, tokens)


def emit_compilation(comp, out_dir: str, dialect: str = "linalg-on-tensors", batch: int = 1, tokens: int = 8,
                     seed: int = 0, **options) -> list[str]:
    """Registry adapter: static PyTorch code for ``comp`` -> ``Model(seed)`` -> ``<model>.mlir``.

    Needs the PyTorch backend's static mode (``emit(comp, dir, static=True)``).  Returns the
    relative paths written into ``out_dir``.  A model that routes by task is exported with a
    third argument, its task ids.
    """
    from moec.backends import check_output_dir, write_tree
    from moec.backends.pytorch import emit as pytorch_emit
    from moec.backends.pytorch import module_name
    from moec.driver import task_count

    _import_fx()  # fail early, before generating anything
    check_output_dir(out_dir)
    name = module_name(comp.graph.name)
    with tempfile.TemporaryDirectory(prefix="moec-mlir-") as tmp:
        pytorch_emit(comp, tmp, static=True)
        module = _load_generated(tmp, name)
        model = module.Model(seed=seed).eval()
        inputs = example_inputs_for(model, batch, tokens, seed, tasks=task_count(comp.graph))
        text = str(lower(model, inputs, dialect))
    return write_tree(out_dir, {f"{name}.mlir": text})


def _load_generated(directory: str, name: str):
    """Import ``directory/<name>.py`` with its runtime files (``moec_*.py`` next to it) fresh."""
    shipped = [f[:-3] for f in os.listdir(directory) if f.startswith("moec_") and f.endswith(".py")]
    saved = {m: sys.modules.pop(m) for m in shipped if m in sys.modules}
    sys.path.insert(0, directory)
    try:
        spec = importlib.util.spec_from_file_location(f"moec_mlir_generated_{name}",
                                                      os.path.join(directory, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(directory)
        for m in shipped:
            sys.modules.pop(m, None)
        sys.modules.update(saved)
