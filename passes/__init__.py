"""IR passes: an explicit registry and the named pipelines built from it."""

from __future__ import annotations

from .analyze import Analyze
from .fusion import FuseExpertGemm, FusePermute, FuseRouter
from .infer_shapes import InferShapes
from .lower_moe import LowerMoE
from .manager import Pass, PassContext, PassFailed, run_pipeline
from .place_experts import PlaceExperts

REGISTRY: dict[str, type[Pass]] = {
    p.name: p for p in (InferShapes, LowerMoE, FuseRouter, FusePermute, FuseExpertGemm, Analyze, PlaceExperts)
}

PIPELINES: dict[str, list[str]] = {
    "default": ["infer-shapes", "lower-moe", "fuse-router", "fuse-permute", "fuse-expert-gemm", "analyze"],
    "unfused": ["infer-shapes", "lower-moe", "analyze"],
    "frontend": ["infer-shapes"],
}

__all__ = ["PIPELINES", "REGISTRY", "Pass", "PassContext", "PassFailed", "make_pipeline", "run_pipeline"]


def make_pipeline(name: str = "default") -> list[Pass]:
    return [REGISTRY[p]() for p in PIPELINES[name]]
