"""Module API of the two ops: multi-head attention layers that hold their grid and window.

Each layer has its own q/k/v/out projections with bias, as ``nn.MultiheadAttention``, and
takes token sequences (B, L, E). ``key`` and ``value`` may each be *shared*, (L, E), the same
for every batch element (RLR's learnable reference), or batched, (B, L, E). A shared input
stays shared through its projection: it is never repeated B times.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .ops import canonical_backend, local_cross_attention, neighbor_masked_attention
from .windows import normalize_grid, normalize_window


class _WindowedMultiheadAttention(nn.Module):
    _op = None  # the functional op, set by subclasses

    def __init__(self, embed_dim: int, num_heads: int, grid: Union[int, Sequence[int]],
                 window: Union[int, Sequence[int]], *, bias: bool = True,
                 scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        backend = canonical_backend(backend)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.grid, self.window = normalize_grid(grid), normalize_window(window)
        self.scale, self.backend = scale, backend
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        # As nn.MultiheadAttention: xavier-uniform projections, zero biases.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, heads, L, D) and shared (L, E) -> (heads, L, D), as views."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _check(self, x: torch.Tensor, name: str, allow_shared: bool) -> None:
        shared_ok = allow_shared and x.dim() == 2
        if not (x.dim() == 3 or shared_ok) or x.shape[-1] != self.embed_dim:
            expected = f"(B, L, {self.embed_dim})" + (f" or shared (L, {self.embed_dim})" if allow_shared else "")
            kind = "" if allow_shared else "batched "
            raise ValueError(f"{name} must be {kind}{expected}, got {tuple(x.shape)}")

    def project(self, query, key, value):
        """The projected heads (q, k, v) the op sees; shared inputs stay shared."""
        self._check(query, "query", allow_shared=False)
        self._check(key, "key", allow_shared=True)
        self._check(value, "value", allow_shared=True)
        return self.split_heads(self.q_proj(query)), self.split_heads(self.k_proj(key)), self.split_heads(self.v_proj(value))

    def attend(self, q, k, v) -> torch.Tensor:
        """Run the op on projected heads and apply the output projection: (B, L, E)."""
        out = type(self)._op(q, k, v, self.grid, self.window, scale=self.scale, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project(query, key, value))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, grid={self.grid}, "
                f"window={self.window}, backend={self.backend!r}")


class LocalCrossAttention(_WindowedMultiheadAttention):
    """Multi-head local cross attention: each query sees only the keys in its window."""

    _op = staticmethod(local_cross_attention)


class NeighborMaskedAttention(_WindowedMultiheadAttention):
    """Multi-head neighbour-masked attention: each query sees every key outside its window."""

    _op = staticmethod(neighbor_masked_attention)
