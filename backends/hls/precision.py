"""The `target hls { ... }` knobs as a typed configuration, with defaults."""

from __future__ import annotations

from dataclasses import dataclass

ROUND_MODES = {"nearest": "AP_RND", "truncate": "AP_TRN", "convergent": "AP_RND_CONV"}
OVERFLOW_MODES = {"saturate": "AP_SAT", "wrap": "AP_WRAP"}


@dataclass(frozen=True)
class Fixed:
    """A signed fixed-point type ap_fixed<width, integer, round, overflow>."""

    width: int
    integer: int
    round: str = "nearest"
    overflow: str = "saturate"

    @property
    def frac(self) -> int:
        return self.width - self.integer

    @property
    def lsb(self) -> float:
        return 2.0 ** -self.frac

    @property
    def max(self) -> float:
        """The largest representable value."""
        return 2.0 ** (self.integer - 1) - self.lsb

    @property
    def cpp(self) -> str:
        return f"ap_fixed<{self.width}, {self.integer}, {ROUND_MODES[self.round]}, {OVERFLOW_MODES[self.overflow]}>"

    def __str__(self) -> str:
        return f"fixed({self.width}, {self.integer}, round = {self.round}, overflow = {self.overflow})"


# Defaults: weights of trained transformers lie well inside +-8; activations (the residual stream)
# inside +-128; sums get 12 more integer bits than activations. All round to nearest and saturate
# except the accumulators, which are wide enough to wrap-free by construction of the defaults.
DEFAULT_WEIGHTS = Fixed(18, 4)
DEFAULT_ACTIVATIONS = Fixed(20, 8)
DEFAULT_ACCUMULATORS = Fixed(32, 12, "truncate", "saturate")


@dataclass(frozen=True)
class HlsConfig:
    weights: Fixed = DEFAULT_WEIGHTS
    activations: Fixed = DEFAULT_ACTIVATIONS
    accumulators: Fixed = DEFAULT_ACCUMULATORS
    reuse: int = 1
    max_tokens: int = 32
    max_unroll: int = 64
    m_axi_threshold: int = 1 << 16  # entries of one expert matrix above which it lives off chip
    part: str = "xcu250-figd2104-2L-e"
    clock: float = 5.0  # ns

    @classmethod
    def from_settings(cls, settings: dict | None) -> HlsConfig:
        """From the checked `target hls` settings of a ModelSpec (see dsl/kinds.py HLS_SETTINGS)."""
        s = dict(settings or {})
        base = Fixed(**s["precision"]) if "precision" in s else None
        kinds = {k: Fixed(**s[k]) if k in s else base for k in ("weights", "activations", "accumulators")}
        kinds = {k: v for k, v in kinds.items() if v is not None}
        numbers = {k: s[k] for k in ("reuse", "max_tokens", "max_unroll", "m_axi_threshold", "part") if k in s}
        if "clock" in s:
            numbers["clock"] = float(s["clock"])
        return cls(**kinds, **numbers)
