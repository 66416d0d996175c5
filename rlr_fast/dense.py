"""The dense backend ("dense"): both ops and nearest_reference computed in full, the oracle every
other backend is tested against.

Plain PyTorch on an L x L mask, gradients by autograd. Slow and memory hungry
(O(B * heads * L^2)), exact by construction. Softmax and accumulation run in float32
(float64 inputs stay float64 so ``gradcheck`` is meaningful).
"""
from __future__ import annotations

import torch

from .windows import window_mask


def dense_masked_attention(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v over the keys ``allowed`` (L, L) marks for each query."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    # A shared k or v is (heads, L, D); broadcasting over the batch is what makes it shared.
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, heads, L, L)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(q.dtype)


def local_cross_attention(q, k, v, grid, window, scale: float) -> torch.Tensor:
    """out_i = sum_{j in window(i)} softmax_j(scale * q_i . k_j) v_j, dense."""
    allowed = window_mask(grid, window, q.device)
    return dense_masked_attention(q, k, v, allowed, scale)


def neighbor_masked_attention(q, k, v, grid, window, scale: float) -> torch.Tensor:
    """out_i = sum_{j not in window(i)} softmax_j(scale * q_i . k_j) v_j, dense."""
    allowed = ~window_mask(grid, window, q.device)
    return dense_masked_attention(q, k, v, allowed, scale)


def nearest_reference(x, ref, eps: float, metric: str = "cosine"):
    """Index and cosine similarity (``metric="cosine"``) or Euclidean distance (``"l2"``) of each
    token's nearest reference token, dense.

    Materialises every (B, N, M) score. Cosine: rows are normalised as ``x / max(||x||, eps)``.
    L2: the nearest row maximises ``x . r - ||r||^2 / 2`` (the squared distance less the token's
    own ``||x||^2``, halved), and the distance is ``sqrt(max(||x||^2 - 2 max, 0))``. Ties go to
    the lowest reference index.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if metric == "l2":
        xf, rf = x.to(compute), ref.to(compute)
        scores = torch.matmul(xf, rf.transpose(-1, -2)) - 0.5 * rf.pow(2).sum(-1).unsqueeze(-2)  # (B, N, M)
    else:
        xn = torch.nn.functional.normalize(x.to(compute), dim=-1, eps=eps)
        rn = torch.nn.functional.normalize(ref.to(compute), dim=-1, eps=eps)
        scores = torch.matmul(xn, rn.transpose(-1, -2))  # (B, N, M); a shared ref broadcasts
    best = scores.amax(dim=-1)
    index = (scores == best.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)  # the first maximum
    if metric == "l2":
        best = (xf.pow(2).sum(-1) - 2 * best).clamp_min(0).sqrt()
    return index, best
