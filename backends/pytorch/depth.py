"""Mixture-of-Depths for generated models: which tokens go through a block, and putting them back.

Shipped next to generated files as ``moec_depth.py`` (it imports torch and ``moec_runtime``).

A block with a depth router runs its sublayers on the rows of the tokens it keeps, in sequence
order; attention pads them back into per-sequence rows (``DepthRoute.pad``) and masks the padding.
Without ``modalities`` every sequence keeps the same number of tokens: no padding, no host sync,
and the route exports (the static form); with them, two host syncs per layer (the kept rows and
the padded length). The static form of a route over some modalities (``DepthRouter(static=True)``)
keeps every token's row and a mask of the kept ones instead: fixed shapes, the whole block's work.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:  # inside the moec package
    from .runtime import descending_rank
except ImportError:  # shipped next to generated code, beside moec_runtime.py
    from moec_runtime import descending_rank

__all__ = ["DepthRoute", "DepthRouter", "depth_combine"]


@dataclass
class DepthRoute:
    """The tokens a depth router kept. x [..., S, d] holds `sequences` sequences of `seq_len` tokens;
    kept token i is flat row rows[i] (sorted: by sequence, then position), at position positions[i]
    of sequence sequence[i], slot slots[i] among its sequence's kept tokens; its change is scaled by
    weight[i]."""

    rows: Tensor
    sequence: Tensor
    positions: Tensor
    slots: Tensor
    weight: Tensor
    sequences: int
    seq_len: int
    max_kept: int  # the most tokens any sequence kept (the padded length for attention)
    kept: Tensor | None = None  # static form: rows are all tokens, kept[i] says if the router kept row i

    def select_rows(self, x: Tensor) -> Tensor:
        """The kept tokens' rows [N, d] of x [..., S, d]."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.rows)

    def select_ids(self, ids: Tensor) -> Tensor:
        """The kept tokens' entries [N] of per-token ids [..., S]."""
        return ids.reshape(-1).index_select(0, self.rows)

    @property
    def full(self) -> bool:
        """Every sequence kept the same number of tokens (always so without `modalities`): the
        padded form is a reshape, with no padding to mask."""
        return self.rows.shape[0] == self.sequences * self.max_kept

    def pad(self, rows: Tensor) -> Tensor:
        """Kept rows [N, ...] -> [sequences, max_kept, ...] in sequence order (zeros after each
        sequence's kept tokens)."""
        if self.full:
            return rows.reshape(self.sequences, self.max_kept, *rows.shape[1:])
        out = rows.new_zeros((self.sequences, self.max_kept, *rows.shape[1:]))
        return out.index_put((self.sequence, self.slots), rows)

    def unpad(self, padded: Tensor) -> Tensor:
        if self.full:
            return padded.reshape(self.rows.shape[0], *padded.shape[2:])
        return padded[self.sequence, self.slots]

    def padded_positions(self) -> Tensor:
        return self.pad(self.positions)

    def attention_mask(self, causal: bool) -> Tensor | None:
        """[sequences, 1, max_kept, max_kept] booleans (True: may attend): kept tokens attend to the
        kept tokens of their sequence (earlier or equal positions when causal); padding queries see
        everything, so no row is fully masked. None when there is no padding (`full`): plain
        (causal) attention over the kept tokens. In the static form (`kept`) a token the router
        skipped is no key for the others; as a query (its output is dropped) it sees itself too."""
        if self.kept is not None:
            slot = torch.arange(self.seq_len, device=self.rows.device)
            keys = self.kept.reshape(self.sequences, 1, self.seq_len)
            allowed = keys | (slot[:, None] == slot[None, :])  # [sequences, S, S]
            if causal:
                allowed = allowed & (slot[None, :] <= slot[:, None])
            return allowed[:, None]
        if self.full:
            return None
        counts = torch.bincount(self.sequence, minlength=self.sequences)
        slot = torch.arange(self.max_kept, device=self.rows.device)
        valid = slot[None, :] < counts[:, None]  # [sequences, max_kept]
        allowed = valid[:, None, :] | ~valid[:, :, None]
        if causal:
            allowed = allowed & (slot[None, :] <= slot[:, None])[None]
        return allowed[:, None]


class DepthRouter(nn.Module):
    """Scores each token with one linear unit; per sequence keeps the ceil(ratio * n) highest-scoring
    of its n candidate tokens (tokens of `modalities`; all tokens when empty; ties go to the
    earlier position). Tokens of other modalities are always kept, with weight 1; a kept candidate's
    weight is sigmoid(score) or tanh(score). ``static=True`` (with `modalities`): the route keeps
    every token's row with a mask of the kept ones (``DepthRoute.kept``), so no shape depends on the
    modality ids (no host sync; torch.export works)."""

    def __init__(self, dim: int, ratio: float, modalities: tuple[int, ...] = (), weight: str = "sigmoid",
                 static: bool = False):
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"DepthRouter: ratio must be in (0, 1], got {ratio}")
        if weight not in ("sigmoid", "tanh"):
            raise ValueError(f"DepthRouter: weight must be 'sigmoid' or 'tanh', got {weight!r}")
        self.router = nn.Linear(dim, 1, bias=False)
        self.ratio, self.modalities, self.weight, self.static = ratio, tuple(modalities), weight, static

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, modalities={self.modalities}, weight={self.weight}, static={self.static}"

    def quota(self, candidates: int) -> int:
        """How many of a sequence's `candidates` tokens it keeps: ceil(ratio * candidates)."""
        return _quotas(self.ratio, candidates)[candidates]

    def forward(self, x: Tensor, modality: Tensor) -> DepthRoute:
        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        sequences = math.prod(x.shape[:-2]) if x.dim() > 2 else 1
        scores = self.router(x.reshape(sequences, seq_len, x.shape[-1])).squeeze(-1)  # [B, S]
        if not self.modalities:
            return self._route_every_token(scores, sequences, seq_len)
        # candidates of some modalities: how many tokens a sequence keeps depends on its ids
        mods = modality.reshape(sequences, seq_len)
        candidate = functools.reduce(torch.logical_or, [mods == m for m in self.modalities])  # (isin: no TOSA)
        quotas = torch.tensor(_quotas(self.ratio, seq_len), device=x.device)
        quota = quotas.index_select(0, candidate.sum(1))  # [B]
        rank = descending_rank(scores.detach().masked_fill(~candidate, float("-inf")))
        keep = ~candidate | (rank < quota[:, None])
        gate = torch.sigmoid(scores) if self.weight == "sigmoid" else torch.tanh(scores)
        weight = torch.where(candidate, gate, torch.ones_like(gate))
        if self.static:
            every = torch.arange(sequences * seq_len, device=x.device)
            return DepthRoute(rows=every, sequence=torch.div(every, seq_len, rounding_mode="floor"),
                              positions=every % seq_len, slots=every % seq_len, weight=weight.reshape(-1),
                              sequences=sequences, seq_len=seq_len, max_kept=seq_len, kept=keep.reshape(-1))
        rows = keep.reshape(-1).nonzero().squeeze(1)  # host sync: the number of kept tokens
        slots = (torch.cumsum(keep.long(), dim=1) - 1).reshape(-1).index_select(0, rows)
        kept = keep.sum(1)
        return DepthRoute(rows=rows, sequence=torch.div(rows, seq_len, rounding_mode="floor"),
                          positions=rows % seq_len, slots=slots, weight=weight.reshape(-1).index_select(0, rows),
                          sequences=sequences, seq_len=seq_len,
                          max_kept=int(kept.max()) if sequences else 0)  # host sync: the padded length

    def _route_every_token(self, scores: Tensor, sequences: int, seq_len: int) -> DepthRoute:
        """Every token a candidate: each sequence keeps the same number of tokens, k = ceil(ratio *
        seq_len), so no size depends on the data (no host sync; the static form exports it)."""
        k = self.quota(seq_len)
        positions = _top_positions(scores.detach(), k)  # [B, k], ascending
        gate = torch.sigmoid(scores) if self.weight == "sigmoid" else torch.tanh(scores)
        first = torch.arange(sequences, device=scores.device).unsqueeze(1)
        return DepthRoute(rows=(positions + first * seq_len).reshape(-1), sequence=first.expand(-1, k).reshape(-1),
                          positions=positions.reshape(-1),
                          slots=torch.arange(k, device=scores.device).expand(sequences, k).reshape(-1),
                          weight=gate.gather(1, positions).reshape(-1), sequences=sequences, seq_len=seq_len,
                          max_kept=k)


@functools.lru_cache(maxsize=64)
def _quotas(ratio: float, seq_len: int) -> tuple[int, ...]:
    """ceil(ratio * n) for n = 0..seq_len: the kept count of a sequence with n candidate tokens."""
    return tuple(min(max(math.ceil(n * ratio - 1e-9), 0), n) for n in range(seq_len + 1))


def _top_positions(scores: Tensor, k: int) -> Tensor:
    """Per row of scores [B, S], the positions of its k highest scores (ties: the earlier position),
    in ascending order. Under torch.export (no MLIR dialect lowers a sort) from ``descending_rank``
    and comparisons: O(S^2) per row, as attention itself."""
    if not torch.compiler.is_exporting():
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return order.sort(dim=1).values
    S = scores.shape[1]
    pos = torch.arange(S, device=scores.device)
    kept = descending_rank(scores) < k  # [B, S]
    slot = (kept.unsqueeze(1) & (pos.unsqueeze(0) < pos.unsqueeze(1))).sum(2)  # kept tokens before s
    at = kept.unsqueeze(2) & (slot.unsqueeze(2) == torch.arange(k, device=scores.device))  # [B, S, k]
    return (at * pos.view(1, S, 1)).sum(1)


def depth_combine(x: Tensor, kept: Tensor, route: DepthRoute) -> Tensor:
    """x with each kept token's row moved by weight * (block output - x); skipped tokens keep x.
    The kept rows are distinct: written with index_copy (which every MLIR dialect lowers)."""
    flat = x.reshape(-1, x.shape[-1])
    if route.kept is not None:  # static form: every row went through the block
        moved = flat + (kept - flat) * route.weight.to(kept.dtype)[:, None]
        return torch.where(route.kept[:, None], moved, flat).reshape(x.shape)
    before = flat.index_select(0, route.rows)
    moved = before + (kept - before) * route.weight.to(kept.dtype)[:, None]
    return flat.index_copy(0, route.rows, moved).reshape(x.shape)
