"""Mixture-of-Depths for generated models: which tokens go through a block, and putting them back.

Shipped next to generated files as ``moec_depth.py`` (it imports only torch).

A block with a depth router runs its sublayers on the rows of the tokens it keeps, in sequence
order; attention pads them back into per-sequence rows (``DepthRoute.pad``) and masks the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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

    def select_rows(self, x: Tensor) -> Tensor:
        """The kept tokens' rows [N, d] of x [..., S, d]."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.rows)

    def select_ids(self, ids: Tensor) -> Tensor:
        """The kept tokens' entries [N] of per-token ids [..., S]."""
        return ids.reshape(-1).index_select(0, self.rows)

    def pad(self, rows: Tensor) -> Tensor:
        """Kept rows [N, ...] -> [sequences, max_kept, ...] in sequence order (zeros after each
        sequence's kept tokens)."""
        out = rows.new_zeros((self.sequences, self.max_kept, *rows.shape[1:]))
        return out.index_put((self.sequence, self.slots), rows)

    def unpad(self, padded: Tensor) -> Tensor:
        return padded[self.sequence, self.slots]

    def padded_positions(self) -> Tensor:
        return self.pad(self.positions)

    def attention_mask(self, causal: bool) -> Tensor:
        """[sequences, 1, max_kept, max_kept] booleans (True: may attend): kept tokens attend to the
        kept tokens of their sequence (earlier or equal positions when causal); padding queries see
        everything, so no row is fully masked."""
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
    weight is sigmoid(score) or tanh(score)."""

    def __init__(self, dim: int, ratio: float, modalities: tuple[int, ...] = (), weight: str = "sigmoid"):
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"DepthRouter: ratio must be in (0, 1], got {ratio}")
        if weight not in ("sigmoid", "tanh"):
            raise ValueError(f"DepthRouter: weight must be 'sigmoid' or 'tanh', got {weight!r}")
        self.router = nn.Linear(dim, 1, bias=False)
        self.ratio, self.modalities, self.weight = ratio, tuple(modalities), weight

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, modalities={self.modalities}, weight={self.weight}"

    def forward(self, x: Tensor, modality: Tensor) -> DepthRoute:
        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        sequences = math.prod(x.shape[:-2]) if x.dim() > 2 else 1
        scores = self.router(x.reshape(sequences, seq_len, x.shape[-1])).squeeze(-1)  # [B, S]
        if self.modalities:
            ids = torch.tensor(self.modalities, device=x.device)
            candidate = torch.isin(modality.reshape(sequences, seq_len), ids)
        else:
            candidate = torch.ones(sequences, seq_len, dtype=torch.bool, device=x.device)
        quota = torch.ceil(candidate.sum(1).double() * self.ratio - 1e-9)  # [B]
        ranked = scores.detach().masked_fill(~candidate, float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(seq_len, device=x.device).expand_as(order))
        keep = ~candidate | (rank < quota[:, None])
        gate = torch.sigmoid(scores) if self.weight == "sigmoid" else torch.tanh(scores)
        weight = torch.where(candidate, gate, torch.ones_like(gate))
        rows = keep.reshape(-1).nonzero().squeeze(1)  # host sync: the number of kept tokens
        slots = (torch.cumsum(keep.long(), dim=1) - 1).reshape(-1).index_select(0, rows)
        kept = keep.sum(1)
        return DepthRoute(rows=rows, sequence=torch.div(rows, seq_len, rounding_mode="floor"),
                          positions=rows % seq_len, slots=slots, weight=weight.reshape(-1).index_select(0, rows),
                          sequences=sequences, seq_len=seq_len,
                          max_kept=int(kept.max()) if sequences else 0)  # host sync: the padded length


def depth_combine(x: Tensor, kept: Tensor, route: DepthRoute) -> Tensor:
    """x with each kept token's row moved by weight * (block output - x); skipped tokens keep x."""
    flat = x.reshape(-1, x.shape[-1])
    delta = (kept - flat.index_select(0, route.rows)) * route.weight.to(kept.dtype)[:, None]
    return flat.index_add(0, route.rows, delta).reshape(x.shape)
