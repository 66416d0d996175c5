"""The chunked implementation of both ops, on any device (the ``torch`` backend's general path).

Both ops are computed as a loop over *chunks* of query blocks. A chunk holds ``g`` groups of
``M`` queries that see the same ``N`` candidate keys; its scores live only for that chunk, so
peak memory is bounded by the chunk size, never by B * heads * L * L. Backward recomputes the
scores chunk by chunk (as FlashAttention does) instead of saving probabilities.

Block layout (shapes with ``h`` heads, ``g`` groups in the chunk, batch ``B``):

    queries  qb  (h, g, B, M, D)
    shared   kb  (h, g, N, D)        batched  kb  (h, g, B, N, D)
    scores   S   (h, g, B, M, N)

The batch sits *inside* the matrix dimension: for a shared key, ``S = qb.view(h, g, B*M, D) @
kb^T`` is one product per group whose key block is read once for every batch element, and the
gradient of a shared key or value, ``dS^T @ Q``, is summed over the batch by the same product.
A shared k or v is therefore never expanded B times.

- LCA groups are 2D query tiles of the grid (``Ty x Tx`` tokens); their candidate keys are the
  key patch that covers every window of the tile (``(Ty + kh - 1) x (Tx + kw - 1)`` clipped to the
  grid). A tile's mask is an additive bias built once per geometry and cached.
- MLKA groups are bands of query rows that see every key; the window mask is written into the
  scores only over the band of key rows it can touch.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import torch

from ..windows import in_window
from .autocast import autocast_declared

# Scores held at once per chunk, in elements: large enough that the products are efficient,
# small enough that a chunk's scores stay near the cache (about 2 MiB of fp32).
CHUNK_ELEMENTS = 1 << 19


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation run in float32 (float64 stays float64, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Products in block layout. `shared` means the right operand has no batch dimension.
# ----------------------------------------------------------------------------------------------

def _fold(x: torch.Tensor) -> torch.Tensor:
    """(h, g, B, M, X) -> (h, g, B*M, X): the batch joins the matrix rows (a view)."""
    h, g, b, m, n = x.shape
    return x.view(h, g, b * m, n)


def _rows_times(a: torch.Tensor, rhs: torch.Tensor, shared: bool) -> torch.Tensor:
    """a (h, g, B, M, X) @ rhs -> (h, g, B, M, Y); rhs is (h, g, X, Y) shared or (h, g, B, X, Y)."""
    if shared:
        return torch.matmul(_fold(a), rhs).view(*a.shape[:-1], rhs.shape[-1])
    return torch.matmul(a, rhs)


def _rows_transposed_times(a: torch.Tensor, b: torch.Tensor, shared: bool) -> torch.Tensor:
    """a^T @ b over the rows M of (h, g, B, M, X) and (h, g, B, M, Y).

    Shared: (h, g, X, Y), summed over the batch by the product itself. Batched: (h, g, B, X, Y).
    """
    if shared:
        return torch.matmul(_fold(a).transpose(-1, -2), _fold(b))
    return torch.matmul(a.transpose(-1, -2), b)


def _probabilities(qb, kb, k_shared: bool, plan, chunk) -> torch.Tensor:
    """Masked softmax over the chunk's candidate keys: P (h, g, B, M, N), float."""
    scores = _rows_times(qb, kb.transpose(-1, -2), k_shared)
    plan.mask_(scores, chunk)
    return torch.softmax(scores, dim=-1)


def _new_blocks(view: torch.Tensor, dtype, scale: float = 1.0) -> torch.Tensor:
    """A fresh contiguous copy of a (permuted) view in `dtype`, times `scale`: never an alias."""
    out = torch.empty(view.shape, dtype=dtype, device=view.device)
    out.copy_(view)
    return out.mul_(scale) if scale != 1.0 else out


class _Plan:
    """What a plan provides to the shared forward/backward loop.

    Per chunk, ``query_block`` cuts a (B, h, L, X) tensor (queries, outputs, their gradients)
    into blocks (h, g, B, M, X) and ``write_block`` puts blocks back, so no full-size copy of any
    of them is ever made. Keys and values are held as shared (h, L, D) or batched (h, B, L, D);
    ``key_block`` gives a chunk's candidate keys and ``add_key_grad_`` adds their gradients back.
    """

    @staticmethod
    def keys_layout(t: torch.Tensor, dtype) -> torch.Tensor:
        if t.dim() == 3:
            return t.to(dtype).contiguous()
        return _new_blocks(t.transpose(0, 1), dtype)

    @staticmethod
    def finish_keys(t: torch.Tensor, dtype) -> torch.Tensor:
        return (t if t.dim() == 3 else t.transpose(0, 1)).to(dtype)


# ----------------------------------------------------------------------------------------------
# LCA: 2D query tiles and the key patch that covers their windows.
# ----------------------------------------------------------------------------------------------

def lca_tile(grid: Tuple[int, int], window: Tuple[int, int], batch: int = 1, shared: bool = True) -> Tuple[int, int]:
    """Query tile (Ty, Tx) for a grid and window, a batch, and whether k and v are shared.

    Candidate keys per query are (Ty + kh - 1)(Tx + kw - 1) / (Ty Tx): small tiles waste fewer
    scores, large tiles make fewer and larger products. On the CPU the products are tiny (tile
    rows x head dim x patch) and their number, not their flops, sets the time, so tiles of 4 x 4
    win, except that a shared k folds the batch into the rows: from 8 batch elements the products
    are large enough for 2 x 4 tiles to waste less. Measured on 2 CPU threads, forward and backward,
    grids 8 to 64 with windows 3 to 11, batches 1 to 8 (benchmarks/lca_tiles.py, results in
    benchmarks/results/lca-tiles.json). Tiles never exceed the grid; the window does not enter.
    """
    (h, w) = grid
    ty, tx = (2, 4) if shared and batch >= 8 else (4, 4)
    return min(ty, h), min(tx, w)


class LCAPlan(_Plan):
    """Geometry of LCA on one grid: tiles, each tile's key patch, and each tile's mask."""

    def __init__(self, grid, window, device, dtype, tile=None):
        (self.H, self.W), (kh, kw) = grid, window
        self.Ty, self.Tx = tile or lca_tile(grid, window)
        ry, rx = kh // 2, kw // 2
        self.nTy, self.nTx = math.ceil(self.H / self.Ty), math.ceil(self.W / self.Tx)
        self.G, self.M = self.nTy * self.nTx, self.Ty * self.Tx
        # Key patch of a tile: rows [y0 - ry, y0 + Ty + ry) clipped to the grid, kept at a fixed
        # size by sliding it inside the grid (it still covers every window of the tile).
        npy, npx = min(self.Ty + kh - 1, self.H), min(self.Tx + kw - 1, self.W)
        self.N = npy * npx
        ty = torch.arange(self.nTy, device=device)
        tx = torch.arange(self.nTx, device=device)
        start_y = (ty * self.Ty - ry).clamp(0, self.H - npy)  # (nTy,)
        start_x = (tx * self.Tx - rx).clamp(0, self.W - npx)  # (nTx,)
        key_y = start_y[:, None] + torch.arange(npy, device=device)  # (nTy, npy)
        key_x = start_x[:, None] + torch.arange(npx, device=device)  # (nTx, npx)
        # Token index of every candidate key: (G, N), tiles in row-major order.
        self.key_index = (key_y[:, None, :, None] * self.W + key_x[None, :, None, :]).reshape(self.G, self.N)
        # Coordinates of every query of every tile: (nTy, Ty) and (nTx, Tx).
        q_y = ty[:, None] * self.Ty + torch.arange(self.Ty, device=device)
        q_x = tx[:, None] * self.Tx + torch.arange(self.Tx, device=device)
        near_y = in_window(q_y[:, :, None], key_y[:, None, :], kh)  # (nTy, Ty, npy)
        near_x = in_window(q_x[:, :, None], key_x[:, None, :], kw)  # (nTx, Tx, npx)
        # (nTy, nTx, Ty, Tx, npy, npx) -> (G, M, N)
        allowed = near_y[:, None, :, None, :, None] & near_x[None, :, None, :, None, :]
        # Padding queries (beyond the grid) see every candidate: their rows are discarded, and a
        # row with no key would make NaNs that the backward multiplies by zero.
        padded = (q_y >= self.H)[:, None, :, None, None, None] | (q_x >= self.W)[None, :, None, :, None, None]
        allowed = (allowed | padded).reshape(self.G, 1, self.M, self.N)
        self.bias = torch.zeros(self.G, 1, self.M, self.N, device=device, dtype=dtype)
        self.bias.masked_fill_(~allowed, float("-inf"))  # (G, 1, M, N): broadcast over the batch

    def chunks(self, heads: int, batch: int):
        """Chunks are ranges of tile rows (`slice` over 0..nTy)."""
        per_row = heads * batch * self.M * self.N * self.nTx
        rows = max(1, CHUNK_ELEMENTS // per_row)
        return [slice(r0, min(r0 + rows, self.nTy)) for r0 in range(0, self.nTy, rows)]

    def _tiles(self, chunk: slice) -> slice:
        return slice(chunk.start * self.nTx, chunk.stop * self.nTx)

    def query_block(self, x: torch.Tensor, chunk: slice, dtype, scale: float = 1.0) -> torch.Tensor:
        """Contiguous (B, h, L, X) -> the chunk's tiles (h, g, B, M, X); padding tokens are zero."""
        b, h, _, d = x.shape
        y0, y1 = chunk.start * self.Ty, min(chunk.stop * self.Ty, self.H)
        nty = chunk.stop - chunk.start
        rows = x.view(b, h, self.H, self.W, d)[:, :, y0:y1]
        pad_y, pad_x = nty * self.Ty - (y1 - y0), self.nTx * self.Tx - self.W
        if pad_y or pad_x:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pad_x, 0, pad_y))
        tiles = rows.view(b, h, nty, self.Ty, self.nTx, self.Tx, d).permute(1, 2, 4, 0, 3, 5, 6)
        return _new_blocks(tiles, dtype, scale).view(h, nty * self.nTx, b, self.M, d)

    def write_block(self, dst: torch.Tensor, block: torch.Tensor, chunk: slice) -> None:
        """The chunk's tiles (h, g, B, M, X) -> their tokens of a contiguous (B, h, L, X)."""
        h, _, b, _, d = block.shape
        y0, y1 = chunk.start * self.Ty, min(chunk.stop * self.Ty, self.H)
        nty = chunk.stop - chunk.start
        rows = block.view(h, nty, self.nTx, b, self.Ty, self.Tx, d).permute(3, 0, 1, 4, 2, 5, 6)
        rows = rows.reshape(b, h, nty * self.Ty, self.nTx * self.Tx, d)
        dst.view(b, h, self.H, self.W, d)[:, :, y0:y1] = rows[:, :, : y1 - y0, : self.W]

    def key_block(self, t: torch.Tensor, chunk: slice) -> torch.Tensor:
        """Key patches of the chunk's tiles: shared (h, g, N, D), batched (h, g, B, N, D)."""
        tiles = self._tiles(chunk)
        index = self.key_index[tiles].reshape(-1)
        g = tiles.stop - tiles.start
        if t.dim() == 3:
            h, _, d = t.shape
            return t.index_select(1, index).view(h, g, self.N, d)
        h, b, _, d = t.shape
        return t.index_select(2, index).view(h, b, g, self.N, d).transpose(1, 2).contiguous()

    def add_key_grad_(self, dst: torch.Tensor, src: torch.Tensor, chunk: slice) -> None:
        """Add key-patch gradients back to their tokens: the adjoint of `key_block`."""
        index = self.key_index[self._tiles(chunk)].reshape(-1)
        src = src.to(dst.dtype)  # under autocast the products arrive in 16 bits; dst accumulates in float32
        if dst.dim() == 3:  # shared: src (h, g, N, D)
            dst.index_add_(1, index, src.reshape(src.shape[0], -1, src.shape[-1]))
        else:  # batched: dst (h, B, L, D), src (h, g, B, N, D)
            h, g, b, n, d = src.shape
            dst.index_add_(2, index, src.transpose(1, 2).reshape(h, b, g * n, d))

    def mask_(self, scores: torch.Tensor, chunk: slice) -> None:
        scores.add_(self.bias[self._tiles(chunk)])


@lru_cache(maxsize=32)
def lca_plan(grid, window, device, dtype, tile=None) -> LCAPlan:
    return LCAPlan(grid, window, device, dtype, tile)


# ----------------------------------------------------------------------------------------------
# MLKA: bands of query rows against every key, the window written into the scores.
# ----------------------------------------------------------------------------------------------

class MLKAPlan(_Plan):
    """Geometry of neighbour-masked attention on one grid: bands of query rows, one per chunk."""

    def __init__(self, grid, window, device):
        (self.H, self.W), (kh, kw) = grid, window
        self.ry, self.rx = kh // 2, kw // 2
        x = torch.arange(self.W, device=device)
        self.kh = kh
        self.near_x = in_window(x[:, None], x[None, :], kw)  # (query x, key x)
        self.y = torch.arange(self.H, device=device)
        self.flash_cache = {}  # bands of the CPU flash path and of the dense 16-bit path, per dtype

    def chunks(self, heads: int, batch: int):
        rows = max(1, CHUNK_ELEMENTS // (heads * batch * self.W * self.H * self.W))
        return [slice(r0, min(r0 + rows, self.H)) for r0 in range(0, self.H, rows)]

    def band_chunks(self, rows: int):
        return [slice(r0, min(r0 + rows, self.H)) for r0 in range(0, self.H, rows)]

    def tokens(self, chunk: slice) -> slice:
        """The token range of a chunk (or band) of grid rows."""
        return slice(chunk.start * self.W, chunk.stop * self.W)

    def query_block(self, x: torch.Tensor, chunk: slice, dtype, scale: float = 1.0) -> torch.Tensor:
        """(B, h, L, X) -> (h, 1, B, M, X) for the query rows of the chunk, M = rows * W."""
        return _new_blocks(x[:, :, self.tokens(chunk)].transpose(0, 1).unsqueeze(1), dtype, scale)

    def write_block(self, dst: torch.Tensor, block: torch.Tensor, chunk: slice) -> None:
        dst[:, :, self.tokens(chunk)] = block[:, 0].transpose(0, 1)

    def key_block(self, t: torch.Tensor, chunk: slice) -> torch.Tensor:
        """Every band sees every key: shared (h, 1, L, D), batched (h, 1, B, L, D)."""
        return t.unsqueeze(1)

    def add_key_grad_(self, dst: torch.Tensor, src: torch.Tensor, chunk: slice) -> None:
        dst += src[:, 0]

    def mask_(self, scores: torch.Tensor, chunk: slice) -> None:
        """-inf where the key lies in the query's window, written over the band of key rows only."""
        h, g, b, m, _ = scores.shape
        rows = chunk.stop - chunk.start
        k0, k1 = max(0, chunk.start - self.ry), min(self.H, chunk.stop + self.ry)
        # scores as (..., query row, query x, key row, key x), key rows cut to the band.
        band = scores.view(h, g, b, rows, self.W, self.H, self.W)[..., k0:k1, :]
        near_y = in_window(self.y[chunk, None], self.y[None, k0:k1], self.kh)  # (rows, band rows)
        band.masked_fill_(near_y[:, None, :, None] & self.near_x[None, :, None, :], float("-inf"))


@lru_cache(maxsize=16)
def mlka_plan(grid, window, device) -> MLKAPlan:
    return MLKAPlan(grid, window, device)


def window_bias(plan: MLKAPlan, query_rows: slice, key_rows: slice, dtype):
    """Which (query, key) pairs of these grid rows lie in the query's window, (queries, keys)
    booleans, and the additive mask that removes them (-inf there, 0 elsewhere)."""
    near_y = in_window(plan.y[query_rows, None], plan.y[None, key_rows], plan.kh)  # (query rows, key rows)
    inside = near_y[:, None, :, None] & plan.near_x[None, :, None, :]  # (qy, qx, ky, kx)
    inside = inside.reshape(near_y.shape[0] * plan.W, near_y.shape[1] * plan.W)
    return inside, torch.zeros(inside.shape, dtype=dtype, device=inside.device).masked_fill_(inside, float("-inf"))



# ----------------------------------------------------------------------------------------------
# The chunked forward and backward, shared by both ops.
# ----------------------------------------------------------------------------------------------

def chunked_forward(plan: _Plan, q, k, v, scale: float, compute) -> torch.Tensor:
    """The output (B, h, L, D) in q's dtype."""
    b, h = q.shape[:2]
    q = q.contiguous()
    kt, vt = plan.keys_layout(k, compute), plan.keys_layout(v, compute)
    out = torch.empty(q.shape, dtype=compute, device=q.device)
    for c in plan.chunks(h, b):
        p = _probabilities(plan.query_block(q, c, compute, scale), plan.key_block(kt, c), k.dim() == 3, plan, c)
        plan.write_block(out, _rows_times(p, plan.key_block(vt, c), v.dim() == 3), c)
    return out.to(q.dtype)


def chunked_backward(plan: _Plan, q, k, v, out, grad_out, scale: float, compute):
    """(dq, dk, dv), recomputing each chunk's probabilities from q and k."""
    b, h = q.shape[:2]
    k_shared, v_shared = k.dim() == 3, v.dim() == 3
    q, out, grad_out = q.contiguous(), out.contiguous(), grad_out.contiguous()
    kt, vt = plan.keys_layout(k, compute), plan.keys_layout(v, compute)
    dkt, dvt = torch.zeros_like(kt), torch.zeros_like(vt)
    dq = torch.empty(q.shape, dtype=compute, device=q.device)
    for c in plan.chunks(h, b):
        qb, gb = plan.query_block(q, c, compute, scale), plan.query_block(grad_out, c, compute)
        kb, vb = plan.key_block(kt, c), plan.key_block(vt, c)
        p = _probabilities(qb, kb, k_shared, plan, c)  # (h, g, B, M, N)
        plan.add_key_grad_(dvt, _rows_transposed_times(p, gb, v_shared), c)  # dV = P^T dO
        delta = plan.query_block(out, c, compute).mul_(gb).sum(-1, keepdim=True)  # rowsum(O * dO)
        ds = _rows_times(gb, vb.transpose(-1, -2), v_shared)  # dP = dO V^T
        ds.sub_(delta).mul_(p)  # dS = P * (dP - delta)
        plan.add_key_grad_(dkt, _rows_transposed_times(ds, qb, k_shared), c)  # dK = dS^T (scale Q)
        plan.write_block(dq, _rows_times(ds, kb, k_shared).mul_(scale), c)  # dQ = scale dS K
    return dq.to(q.dtype), plan.finish_keys(dkt, k.dtype), plan.finish_keys(dvt, v.dtype)


@autocast_declared
class BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        compute = compute_dtype(q.dtype)
        out = chunked_forward(plan, q, k, v, scale, compute)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.scale, ctx.compute = plan, scale, compute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        dq, dk, dv = chunked_backward(ctx.plan, q, k, v, out, grad_out, ctx.scale, ctx.compute)
        return dq, dk, dv, None, None

