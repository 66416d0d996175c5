"""The ``torch`` backend of :func:`rlr_fast.nearest_reference`: chunked, memory O(B*N + tile).

The dense way scores every token against every reference token at once, a (B, N, M) tensor
(157 MB per image at 56 x 56 tokens against 4 x 56 x 56 references). Here a chunk of tokens is
scored against all M reference tokens, reduced to its maximum and argmax, and dropped; only the
normalised reference (M, C) and one (rows, M) tile of scores are alive at a time.

The token's norm is divided out after the argmax: it scales a whole row of scores by one
positive number, which changes neither the maximum's position nor (up to rounding) the cosine.
"""
from __future__ import annotations

import torch

# Scores per tile: 2**20 fp32 values (4 MiB) keeps a tile near the cache while each matmul
# still has enough rows to run at the machine's matmul rate.
TILE_SCORES = 1 << 20


def rows_per_tile(num_ref: int) -> int:
    return max(16, TILE_SCORES // max(num_ref, 1))


@torch.no_grad()
def nearest_reference(x: torch.Tensor, ref: torch.Tensor, eps: float):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, n, c = x.shape
    m = ref.shape[-2]
    index = torch.empty(b, n, dtype=torch.int64, device=x.device)
    best = torch.empty(b, n, dtype=compute, device=x.device)
    rows = rows_per_tile(m)
    if ref.dim() == 2 and x.is_contiguous():
        # A shared reference: every token of the batch is a row of one (B*N, C) problem, so the
        # tiles run over the whole batch at once (views, no copy of x).
        _nearest_rows(x.view(b * n, c), _normalized_t(ref, compute, eps), index.view(-1), best.view(-1),
                      rows, compute, eps)
        return index, best
    ref_t = _normalized_t(ref, compute, eps) if ref.dim() == 2 else None  # normalised once if shared
    for i in range(b):
        _nearest_rows(x[i], ref_t if ref_t is not None else _normalized_t(ref[i], compute, eps),
                      index[i], best[i], rows, compute, eps)
    return index, best


def _normalized_t(ref: torch.Tensor, compute, eps: float) -> torch.Tensor:
    """The reference rows normalised, transposed to (C, M) for ``x @ ref_t``."""
    return torch.nn.functional.normalize(ref.to(compute), dim=-1, eps=eps).t()


def _nearest_rows(x, ref_t, index, best, rows: int, compute, eps: float) -> None:
    """Fill index/best (T,) for the tokens x (T, C) against ref_t (C, M), ``rows`` tokens a tile."""
    for start in range(0, x.shape[0], rows):
        xs = x[start:start + rows].to(compute)                   # (rows, C)
        scores = xs @ ref_t                                      # (rows, M)
        arg = scores.argmax(dim=-1)                              # the first maximum
        index[start:start + rows] = arg
        top = scores.gather(-1, arg.unsqueeze(-1)).squeeze(-1)
        best[start:start + rows] = top / xs.norm(dim=-1).clamp_min(eps)
