"""The two ops as plain tensor operations, for tracers and exporters.

``torch.jit.trace``, the ONNX exporters and ``torch.export`` record the tensor operations a call
makes. The ``torch`` backend's fast paths (blocked chunks written in place, PyTorch's private
CPU flash kernel, cached plans) are not something an exporter can translate, and the Triton
kernels are GPU code; so while tracing for export, ``rlr_fast.ops`` computes the same function
with this module instead (``tracing_for_export``). The results agree with every backend (the
tests compare them with ``reference``):

- LCA gathers each query's kh x kw window of keys and values (a constant index table; keys a
  window clips at the border get an additive -inf) and attends over those kh * kw keys only:
  O(L * kh * kw) work, not O(L^2).
- MLKA attends to every key outside the window, which is dense attention with a constant
  mask: the reference implementation's.
- ``nearest_reference`` scores the tokens against fixed chunks of the reference rows and keeps
  a running best: memory O(B * N * chunk), never B x N x M at once.

The geometry tables are cached as numpy arrays, never as tensors: a tensor made while an
exporter traces is one of its fake tensors, and must not outlive the trace.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from . import dense
from .windows import in_window


def tracing_for_export() -> bool:
    """True under ``torch.jit.trace`` (and the legacy ONNX exporter), ``torch.export`` and
    ``torch.onnx.export(dynamo=True)``."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


@lru_cache(maxsize=32)
def _window_table(grid, window):
    """(index, bias) as numpy arrays of shape (L, kh * kw): the token index of each window
    position of each query (0 where the window leaves the grid) and 0 or -inf for those."""
    (h, w), (kh, kw) = grid, window
    y, x = np.divmod(np.arange(h * w), w)
    dy, dx = np.divmod(np.arange(kh * kw), kw)
    ky = y[:, None] + dy[None, :] - kh // 2
    kx = x[:, None] + dx[None, :] - kw // 2
    inside = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    index = np.where(inside, ky * w + kx, 0)
    bias = np.where(inside, 0.0, -np.inf).astype(np.float32)
    return index, bias


def local_cross_attention(q, k, v, grid, window, scale: float) -> torch.Tensor:
    """LCA over the gathered window of each query; shared k/v are gathered once, not per batch."""
    index, bias = _window_table(tuple(grid), tuple(window))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    index = torch.as_tensor(index, device=q.device)
    bias = torch.as_tensor(bias, device=q.device, dtype=compute)
    length, n = index.shape
    # (..., L, D) -> (..., L, n, D): the keys and values of every query's window.
    kw_ = k.to(compute)[..., index.reshape(-1), :].unflatten(-2, (length, n))
    vw = v.to(compute)[..., index.reshape(-1), :].unflatten(-2, (length, n))
    qf = q.to(compute).unsqueeze(-2)  # (B, h, L, 1, D)
    scores = torch.matmul(qf, kw_.transpose(-1, -2)).squeeze(-2) * scale + bias  # (B, h, L, n)
    probs = torch.softmax(scores, dim=-1).unsqueeze(-2)
    return torch.matmul(probs, vw).squeeze(-2).to(q.dtype)


@lru_cache(maxsize=32)
def _outside_window(grid, window) -> np.ndarray:
    """Dense boolean (L, L) numpy mask, True where key j lies outside the window of query i."""
    (h, w), (kh, kw) = grid, window
    y, x = np.divmod(np.arange(h * w), w)
    inside = in_window(y[:, None], y[None, :], kh) & in_window(x[:, None], x[None, :], kw)
    return ~inside


def neighbor_masked_attention(q, k, v, grid, window, scale: float) -> torch.Tensor:
    """MLKA: dense attention with the window masked out, as the reference computes it."""
    allowed = torch.as_tensor(_outside_window(tuple(grid), tuple(window)), device=q.device)
    return dense.dense_masked_attention(q, k, v, allowed, scale)


# Reference rows per step of the traced nearest search: the graph holds one (B*N, chunk) score
# tile at a time, whatever the batch the exported model is run with.
NEAREST_CHUNK = 4096


def nearest_reference(x, ref, eps: float, metric: str = "cosine"):
    """``nearest_reference`` as plain tensor operations: the reference rows in fixed chunks (M is
    known when tracing, the batch is not), each reduced to its maximum and first argmax and merged
    into a running best that a later chunk replaces only where strictly greater (ties to the
    lowest index, as every backend). Scores and outputs as the torch backend's."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, rf = x.to(compute), ref.to(compute)
    if metric == "l2":
        offset = rf.pow(2).sum(-1).mul(-0.5)  # (M,) or (B, M)
    else:
        rf = torch.nn.functional.normalize(rf, dim=-1, eps=eps)
        offset = None
    best = index = None
    m = ref.shape[-2]
    for start in range(0, m, NEAREST_CHUNK):
        scores = torch.matmul(xf, rf[..., start:start + NEAREST_CHUNK, :].transpose(-1, -2))  # (B, N, chunk)
        if offset is not None:
            scores = scores + offset[..., start:start + NEAREST_CHUNK].unsqueeze(-2)
        top, arg = scores.max(dim=-1)
        arg = arg + start
        if best is None:
            best, index = top, arg
        else:
            better = top > best
            best, index = torch.where(better, top, best), torch.where(better, arg, index)
    if metric == "l2":
        return index, (xf.pow(2).sum(-1) - 2 * best).clamp_min(0).sqrt()
    return index, best / xf.norm(dim=-1).clamp_min(eps)
