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
    b, n, _ = x.shape
    m = ref.shape[-2]
    index = torch.empty(b, n, dtype=torch.int64, device=x.device)
    best = torch.empty(b, n, dtype=compute, device=x.device)
    shared = ref.dim() == 2
    ref_t = None
    if shared:  # normalise the shared reference once, (C, M) for x @ ref_t
        ref_t = torch.nn.functional.normalize(ref.to(compute), dim=-1, eps=eps).t()
    rows = rows_per_tile(m)
    for i in range(b):
        if not shared:
            ref_t = torch.nn.functional.normalize(ref[i].to(compute), dim=-1, eps=eps).t()
        for start in range(0, n, rows):
            xs = x[i, start:start + rows].to(compute)                # (rows, C)
            scores = xs @ ref_t                                      # (rows, M)
            arg = scores.argmax(dim=-1)                              # the first maximum
            top = scores.gather(-1, arg.unsqueeze(-1)).squeeze(-1)
            index[i, start:start + rows] = arg
            best[i, start:start + rows] = top / xs.norm(dim=-1).clamp_min(eps)
    return index, best
