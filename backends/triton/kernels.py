"""The view-models of a model's kernel file: which router kernels and activations it needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from moec import ops as O
from moec.backends import BackendError


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def kernel_routed(r: O.RouterSpec) -> bool:
    """Routers the fused router kernel computes; the others keep their PyTorch routing."""
    return (r.kind == "top_k" and r.capacity is None and r.temperature == 1.0) or r.kind == "group_limited"


@dataclass(frozen=True)
class RouterKernel:
    name: str
    num_experts: int
    k: int
    score: str
    renormalize: bool
    scale: float
    has_bias: bool
    groups: int | None
    top_groups: int | None

    @property
    def experts_p2(self) -> int:
        return max(16, next_pow2(self.num_experts))  # tl.dot wants tiles of at least 16

    @property
    def k_p2(self) -> int:
        return next_pow2(self.k)

    @property
    def group_size(self) -> int:
        return self.num_experts // self.groups if self.groups else self.num_experts

    @property
    def doc(self) -> str:
        sel = (f"group-limited top-{self.k} (best {self.top_groups} of {self.groups} groups)" if self.groups
               else f"top-{self.k}")
        extras = [x for x in ("selection-only bias" if self.has_bias else "",
                              "renormalised" if self.renormalize else "",
                              f"scale {self.scale!r}" if self.scale != 1.0 else "") if x]
        return f"{self.num_experts} experts, {self.score} scores, {sel}" + (f", {', '.join(extras)}" if extras else "")


@dataclass
class KernelSet:
    """Collects, while the model file is emitted, the kernels its kernel file must define."""

    routers: list[RouterKernel] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)

    def router(self, r: O.RouterSpec, num_experts: int) -> str:
        groups = r.groups if r.kind == "group_limited" else None
        if groups is not None and (num_experts % groups or not 1 <= (r.top_groups or 0) <= groups):
            raise BackendError(f"group_limited router: {groups} groups do not split {num_experts} experts "
                               f"into equal groups with top_groups={r.top_groups}")
        spec = {"num_experts": num_experts, "k": r.k, "score": r.score, "renormalize": r.renormalize,
                "scale": float(r.scale), "has_bias": r.kind == "group_limited", "groups": groups,
                "top_groups": r.top_groups if groups else None}
        for known in self.routers:
            if all(getattr(known, key) == value for key, value in spec.items()):
                return known.name
        kernel = RouterKernel(name=f"router_{len(self.routers)}_kernel", **spec)
        self.routers.append(kernel)
        return kernel.name

    def activation(self, act: str) -> None:
        if act not in self.activations:
            self.activations.append(act)
