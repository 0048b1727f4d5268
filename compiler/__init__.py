"""moec: a declarative model-graph compiler for Mixture-of-Experts architectures."""

__version__ = "0.1.0"
