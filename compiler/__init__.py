"""moec: a declarative model-graph compiler for Mixture-of-Experts architectures."""

__version__ = "0.1.0"

from moec.api import compile, load  # noqa: E402,A004
from moec.diagnostics import CompileError  # noqa: E402

__all__ = ["__version__", "compile", "load", "CompileError"]
