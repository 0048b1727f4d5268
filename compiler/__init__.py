"""moec: a declarative model-graph compiler for Mixture-of-Experts architectures."""

__version__ = "0.1.0"

from moec.api import compile, load
from moec.diagnostics import CompileError

__all__ = ["CompileError", "__version__", "compile", "load"]
