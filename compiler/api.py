"""Python API: `moec.compile(path, target, out)` and `moec.load(path)`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

from moec import __version__


def compile(path: str, target: str = "pytorch", out: str = "out", **options) -> list[str]:
    """Compile `path` for `target` into directory `out`; return the paths written. `options` are
    the target's own, as on the command line: `static=True` (pytorch), `dialect="tosa"` (mlir)."""
    from moec.backends import targets
    from moec.driver import compile_model

    emitters = targets()
    if target not in emitters:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(sorted(emitters))}")
    files = emitters[target](compile_model(path), out, **options)
    return [os.path.join(out, f) for f in files]


def cache_dir() -> str:
    root = os.environ.get("MOEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moec")
    return os.path.join(root, __version__)


def load(path: str, seed: int = 0, pipeline: str = "default", static: bool = False, plan: dict | str | None = None,
         rank: int = 0, world_size: int = 1, group=None):
    """Compile `path` to PyTorch, import the generated module (cached by content hash) and
    return `Model(seed)`. `pipeline="unfused"` skips the fusion passes (same numerics);
    `static=True` gives the static-shape export form (same numerics, no host syncs).
    `plan` (a placement plan from `moec place`, or its path) gives the expert-parallel form: the
    returned model is rank `rank` of `world_size` in the torch.distributed `group` (default world).
    Raises moec.CompileError (with rendered diagnostics) on a bad file."""
    from moec.backends.pytorch import render
    from moec.driver import compile_model

    comp = compile_model(path, pipeline=pipeline)
    if isinstance(plan, str):
        with open(plan) as fh:
            plan = json.load(fh)
    module = import_generated(comp.graph.name, render(comp.graph, path, static=static, plan=plan))
    if plan is not None:
        return module.Model(seed=seed, rank=rank, world_size=world_size, group=group)
    _check_fits_in_memory(comp.results["analysis"]["params"]["total"], path)
    return module.Model(seed=seed)


def import_generated(model_name: str, code: str):
    """Write generated `code` and the runtime modules it imports into the cache (a directory named
    by their content hash, written once) and import them; returns the generated module."""
    from moec.backends import write_tree
    from moec.backends.pytorch import module_name, runtime_files

    runtimes = runtime_files()
    digest = hashlib.sha256("".join([code, *runtimes.values()]).encode()).hexdigest()[:16]
    out = os.path.join(cache_dir(), digest)
    module_file = os.path.join(out, f"{module_name(model_name)}.py")
    if not os.path.exists(module_file):
        write_tree(out, {os.path.basename(module_file): code, **runtimes})
    for name in runtimes:  # the generated file imports them by these names
        _import(name[:-3], os.path.join(out, name), replace=True)
    return _import(f"moec_generated_{digest}", module_file)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return None


def _check_fits_in_memory(params: int, path: str) -> None:
    """A model whose fp32 parameters alone exceed this machine's memory fails with a clear
    MemoryError before any allocation (instead of the allocator's failure mid-construction)."""
    memory = _physical_memory()
    need = 4 * params
    if memory is not None and need > memory:
        raise MemoryError(f"{path}: the model has {params:,} parameters ({need / 2**30:,.1f} GiB in fp32), more "
                          f"than this machine's {memory / 2**30:,.1f} GiB of memory; `moec report` and "
                          "`moec compile` work on it, building it here does not")


def _import(name: str, file: str, replace: bool = False):
    if name in sys.modules and not replace:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
