"""PyTorch backend: generated, readable nn.Module source."""

from .emit import emit

__all__ = ["emit"]
