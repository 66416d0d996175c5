"""The ``torch`` backend of :func:`rlr_fast.nearest_reference`: chunked, memory O(B*N + tile).

The dense way scores every token against every reference token at once, a (B, N, M) tensor
(157 MB per image at 56 x 56 tokens against 4 x 56 x 56 references). Here a chunk of tokens is
scored against all M reference tokens, reduced to its maximum and argmax, and dropped; only the
normalised reference (M, C) and one (rows, M) tile of scores are alive at a time.

The token's norm is divided out after the argmax: it scales a whole row of scores by one
positive number, which changes neither the maximum's position nor (up to rounding) the cosine.
The Euclidean metric ("l2") is the same argmax with a per-row offset: the nearest row maximises
``x . r - ||r||^2 / 2``, and the token's own ``||x||^2`` turns the maximum into the distance.
"""
from __future__ import annotations

import torch

# Scores per tile: 2**20 fp32 values (4 MiB) keeps a tile near the cache while each matmul
# still has enough rows to run at the machine's matmul rate.
TILE_SCORES = 1 << 20


def rows_per_tile(num_ref: int) -> int:
    return max(16, TILE_SCORES // max(num_ref, 1))


@torch.no_grad()
def nearest_reference(x: torch.Tensor, ref: torch.Tensor, eps: float, metric: str = "cosine"):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, n, c = x.shape
    m = ref.shape[-2]
    index = torch.empty(b, n, dtype=torch.int64, device=x.device)
    best = torch.empty(b, n, dtype=compute, device=x.device)
    rows = rows_per_tile(m)
    l2 = metric == "l2"
    if ref.dim() == 2 and x.is_contiguous():
        # A shared reference: every token of the batch is a row of one (B*N, C) problem, so the
        # tiles run over the whole batch at once (views, no copy of x).
        _nearest_rows(x.view(b * n, c), *_prepared(ref, compute, eps, l2), index.view(-1), best.view(-1),
                      rows, compute, eps, l2)
        return index, best
    shared = _prepared(ref, compute, eps, l2) if ref.dim() == 2 else None  # prepared once if shared
    for i in range(b):
        _nearest_rows(x[i], *(shared if shared is not None else _prepared(ref[i], compute, eps, l2)),
                      index[i], best[i], rows, compute, eps, l2)
    return index, best


def _prepared(ref: torch.Tensor, compute, eps: float, l2: bool):
    """(ref_t (C, M), offset (M,) or None) for scores ``x @ ref_t + offset`` whose argmax is the
    nearest row: cosine, the rows normalised, no offset; l2, the rows as they are and the offset
    ``-||r||^2 / 2`` (``||x - r||^2 = ||x||^2 - 2 (x . r - ||r||^2 / 2)``)."""
    if l2:
        r = ref.to(compute)
        return r.t(), r.pow(2).sum(-1).mul_(-0.5)
    return torch.nn.functional.normalize(ref.to(compute), dim=-1, eps=eps).t(), None


def _nearest_rows(x, ref_t, offset, index, best, rows: int, compute, eps: float, l2: bool) -> None:
    """Fill index/best (T,) for the tokens x (T, C) against ref_t (C, M), ``rows`` tokens a tile."""
    for start in range(0, x.shape[0], rows):
        xs = x[start:start + rows].to(compute)                   # (rows, C)
        scores = xs @ ref_t                                      # (rows, M)
        if offset is not None:
            scores += offset
        arg = scores.argmax(dim=-1)                              # the first maximum
        index[start:start + rows] = arg
        top = scores.gather(-1, arg.unsqueeze(-1)).squeeze(-1)
        if l2:
            best[start:start + rows] = (xs.pow(2).sum(-1) - 2 * top).clamp_min_(0).sqrt_()
        else:
            best[start:start + rows] = top / xs.norm(dim=-1).clamp_min(eps)
