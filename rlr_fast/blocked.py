"""The ``torch`` backend: memory-efficient blocked attention for any device, the fast CPU path.

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
from typing import NamedTuple, Optional, Tuple

import torch

from .precision import bf16_supported

# Scores held at once per chunk, in elements: large enough that the products are efficient,
# small enough that a chunk's scores stay near the cache (about 2 MiB of fp32).
CHUNK_ELEMENTS = 1 << 19


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
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

def lca_tile(grid: Tuple[int, int], window: Tuple[int, int]) -> Tuple[int, int]:
    """Query tile (Ty, Tx) for a grid and window.

    Candidate keys per query are (Ty + kh - 1)(Tx + kw - 1) / (Ty Tx): small tiles waste fewer
    scores, large tiles make fewer and larger products. With the batch folded into the rows, the
    products stay large even for small tiles: on CPU 2 x 2 tiles measured best up to windows of 7
    and 4 x 4 above. Tiles never exceed the grid.
    """
    (h, w), (kh, kw) = grid, window
    side = 2 if max(kh, kw) <= 7 else 4
    return min(side, h), min(side, w)


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
        near_y = (q_y[:, :, None] - key_y[:, None, :]).abs() <= ry  # (nTy, Ty, npy)
        near_x = (q_x[:, :, None] - key_x[:, None, :]).abs() <= rx  # (nTx, Tx, npx)
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


@lru_cache(maxsize=16)
def _lca_plan(grid, window, device, dtype) -> LCAPlan:
    return LCAPlan(grid, window, device, dtype)


# ----------------------------------------------------------------------------------------------
# MLKA: bands of query rows against every key, the window written into the scores.
# ----------------------------------------------------------------------------------------------

class MLKAPlan(_Plan):
    """Geometry of neighbour-masked attention on one grid: bands of query rows, one per chunk."""

    def __init__(self, grid, window, device):
        (self.H, self.W), (kh, kw) = grid, window
        self.ry, self.rx = kh // 2, kw // 2
        x = torch.arange(self.W, device=device)
        self.near_x = (x[:, None] - x[None, :]).abs() <= self.rx  # (query x, key x)
        self.y = torch.arange(self.H, device=device)
        self.flash_cache = {}  # bands of the CPU flash path and of the dense 16-bit path, per dtype

    def chunks(self, heads: int, batch: int):
        rows = max(1, CHUNK_ELEMENTS // (heads * batch * self.W * self.H * self.W))
        return [slice(r0, min(r0 + rows, self.H)) for r0 in range(0, self.H, rows)]

    def band_chunks(self, rows: int):
        return [slice(r0, min(r0 + rows, self.H)) for r0 in range(0, self.H, rows)]

    def _tokens(self, chunk: slice) -> slice:
        return slice(chunk.start * self.W, chunk.stop * self.W)

    def query_block(self, x: torch.Tensor, chunk: slice, dtype, scale: float = 1.0) -> torch.Tensor:
        """(B, h, L, X) -> (h, 1, B, M, X) for the query rows of the chunk, M = rows * W."""
        return _new_blocks(x[:, :, self._tokens(chunk)].transpose(0, 1).unsqueeze(1), dtype, scale)

    def write_block(self, dst: torch.Tensor, block: torch.Tensor, chunk: slice) -> None:
        dst[:, :, self._tokens(chunk)] = block[:, 0].transpose(0, 1)

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
        near_y = (self.y[chunk, None] - self.y[None, k0:k1]).abs() <= self.ry  # (rows, band rows)
        band.masked_fill_(near_y[:, None, :, None] & self.near_x[None, :, None, :], float("-inf"))


@lru_cache(maxsize=16)
def _mlka_plan(grid, window, device) -> MLKAPlan:
    return MLKAPlan(grid, window, device)


# ----------------------------------------------------------------------------------------------
# MLKA on the CPU: PyTorch's fused flash-attention kernel on key ranges, merged by log-sum-exp.
# ----------------------------------------------------------------------------------------------
#
# MLKA costs as much as dense attention (no key is skipped), so on the CPU it is built from the
# fastest dense kernel there is, PyTorch's fused flash attention, which also returns the row
# log-sum-exp. The (query row, key row) pairs of the grid split into the diagonal band that the
# windows touch (an additive mask, built once per band shape) and the rest (no mask at all, which
# spares the kernel a pass over the scores and the reading of a mask).
#
# Forward: bands of query rows; for each, three ranges of whole key rows: the band of key rows the
# band's windows touch (masked), the rows above and the rows below (unmasked). The three partial
# softmaxes merge exactly through their log-sum-exps.
# Backward: bands of *key* rows; for each, three ranges of query rows: those whose windows touch
# the band (masked), those above and those below (unmasked). Given the merged output and
# log-sum-exp, the flash backward of each (queries, keys) block is that block's exact share of the
# gradient. Cutting the keys rather than the queries lets every call run over many queries (the
# kernel parallelises over batch and heads, tiles the queries and accumulates dK and dV over them),
# finishes each band's dK and dV in its own calls, and leaves a single accumulator, dQ.

_flash_forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Queries per forward band: the kernel tiles queries by 256 from 768 queries up, and is markedly
# slower on fewer; more rows per band, on the other hand, widen the share of keys that needs a mask.
FLASH_BAND_QUERIES = 768
# Keys per backward band: the masked queries of a band are its rows and ry rows on either side, so
# thin bands mask fewer pairs but make more calls and more additions into dQ.
FLASH_BAND_KEYS = 1024


class _Range(NamedTuple):
    tokens: slice  # the other side's token range: keys of a query band, queries of a key band
    mask: Optional[torch.Tensor]  # additive (queries, keys) mask, None where no pair is masked
    empty: Optional[torch.Tensor]  # (queries,) rows whose every key here is masked, None if none


class _Band(NamedTuple):
    tokens: slice  # the band's own token range (queries in the forward, keys in the backward)
    ranges: Tuple[_Range, ...]


def _window_bias(plan: "MLKAPlan", query_rows: slice, key_rows: slice, dtype):
    """Which (query, key) pairs of these grid rows lie in the query's window, (queries, keys)
    booleans, and the additive mask that removes them (-inf there, 0 elsewhere)."""
    near_y = (plan.y[query_rows, None] - plan.y[None, key_rows]).abs() <= plan.ry  # (query rows, key rows)
    inside = near_y[:, None, :, None] & plan.near_x[None, :, None, :]  # (qy, qx, ky, kx)
    inside = inside.reshape(near_y.shape[0] * plan.W, near_y.shape[1] * plan.W)
    return inside, torch.zeros(inside.shape, dtype=dtype, device=inside.device).masked_fill_(inside, float("-inf"))


def _flash_bands(plan: "MLKAPlan", dtype, of: str) -> Tuple[_Band, ...]:
    """Bands of grid rows of the queries (``of="queries"``) or of the keys (``of="keys"``), each
    with its ranges of the other side, built once per plan and dtype.

    Interior bands share one mask (the window is translation invariant), so masks are cached by
    the band's shape relative to its first row.
    """
    per_band = FLASH_BAND_QUERIES if of == "queries" else FLASH_BAND_KEYS
    rows = max(1, math.ceil(per_band / plan.W))
    if rows * 2 > plan.H:
        # Two or fewer bands leave too few pairs unmasked to pay for the extra calls: one band.
        rows = plan.H
    cached = plan.flash_cache.get((dtype, of, rows))
    if cached is not None:
        return cached
    w, masks, bands = plan.W, {}, []
    for chunk in plan.band_chunks(rows):
        o0, o1 = max(0, chunk.start - plan.ry), min(plan.H, chunk.stop + plan.ry)
        key = (chunk.stop - chunk.start, o0 - chunk.start, o1 - chunk.start)
        if key not in masks:
            others = slice(o0, o1)
            inside, mask = _window_bias(plan, *((chunk, others) if of == "queries" else (others, chunk)), dtype)
            empty = inside.all(-1)
            masks[key] = (mask, empty if bool(empty.any()) else None)
        ranges = [_Range(slice(o0 * w, o1 * w), *masks[key])]  # the rows the windows touch: masked
        if o0 > 0:
            ranges.append(_Range(slice(0, o0 * w), None, None))  # rows above: no mask
        if o1 < plan.H:
            ranges.append(_Range(slice(o1 * w, plan.H * w), None, None))  # rows below: no mask
        bands.append(_Band(plan._tokens(chunk), tuple(ranges)))
    plan.flash_cache[(dtype, of, rows)] = tuple(bands)
    return plan.flash_cache[(dtype, of, rows)]


def _batched(t: torch.Tensor, b: int) -> torch.Tensor:
    """(B, h, L, D) with unit stride along D, as the kernel reads it; a shared (h, L, D) tensor
    becomes a view with batch stride 0, not a copy."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.expand(b, *t.shape) if t.dim() == 3 else t


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(B, h, L, D) as a view of (B, L, h, D) memory: the kernel's own layout for the gradients it
    returns and for the gradient of the output it reads (which it copies otherwise, every call)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_token_major(shape, dtype, device) -> torch.Tensor:
    """An uninitialised (B, h, L, D) tensor in (B, L, h, D) memory, as the kernel's gradients."""
    b, h, length, d = shape
    return torch.empty(b, length, h, d, dtype=dtype, device=device).transpose(1, 2)


# Autocast: both Functions run their forward in the autocast state they are called in (under bf16
# autocast their products run in bfloat16, softmax and accumulation in float32) and their backward,
# which recomputes the probabilities, in that same state wherever backward() is called from, so the
# gradient is that of the function the forward computed. Declared with torch.amp.custom_fwd and
# custom_bwd for the device of the inputs.
AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_declared(function):
    """``function`` with custom_fwd/custom_bwd applied for the device type of its first input."""
    plain_forward, plain_backward = function.forward, function.backward
    forwards = {d: torch.amp.custom_fwd(plain_forward, device_type=d) for d in AUTOCAST_DEVICES}
    backwards = {d: torch.amp.custom_bwd(plain_backward, device_type=d) for d in AUTOCAST_DEVICES}

    def forward(ctx, q, *args):
        ctx.device_type = q.device.type
        return forwards.get(ctx.device_type, plain_forward)(ctx, q, *args)

    def backward(ctx, *grads):
        return backwards.get(ctx.device_type, plain_backward)(ctx, *grads)

    function.forward, function.backward = staticmethod(forward), staticmethod(backward)
    return function


@_autocast_declared
class _FlashComplementAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        b, h, length, d = q.shape
        q, kb, vb = _batched(q, b), _batched(k, b), _batched(v, b)
        bands = _flash_bands(plan, q.dtype, "queries")
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if len(bands) > 1:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            lse = q.new_empty(b, h, length, dtype=lse_dtype)
        for rows, ranges in bands:
            qc = q[:, :, rows]
            acc, lse_c = None, None
            for keys, mask, empty in ranges:
                o_p, lse_p = _flash_forward(qc, kb[:, :, keys], vb[:, :, keys], attn_mask=mask, scale=scale)
                lse_p = lse_p.to(lse_dtype)
                if empty is not None:
                    # The kernel reports a row with no key as lse 0; it contributes nothing.
                    lse_p = lse_p.masked_fill(empty, float("-inf"))
                if acc is None:
                    acc, lse_c = o_p.to(lse_dtype), lse_p
                    continue
                new_lse = torch.logaddexp(lse_c, lse_p)
                acc.mul_(torch.exp(lse_c - new_lse).unsqueeze(-1))
                acc.add_(o_p.to(lse_dtype).mul_(torch.exp(lse_p - new_lse).unsqueeze(-1)))
                lse_c = new_lse
            if len(bands) == 1:  # the band is the whole grid: no copy
                out, lse = acc.to(q.dtype), lse_c
            else:
                out[:, :, rows] = acc
                lse[:, :, rows] = lse_c
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        b, acc = q.shape[0], lse.dtype
        q, kb, vb = _batched(q, b), _batched(k, b), _batched(v, b)
        grad_out = _token_major(grad_out)
        bands = _flash_bands(plan, q.dtype, "keys")
        if len(bands) == 1 and len(bands[0].ranges) == 1:  # one call: its gradients are the result
            mask = bands[0].ranges[0].mask
            dq, dk, dv = _flash_backward(grad_out, q, kb, vb, out, lse, 0.0, False, attn_mask=mask, scale=scale)
            dk, dv = (dk.sum(0) if k.dim() == 3 else dk), (dv.sum(0) if v.dim() == 3 else dv)
            return dq, dk.to(k.dtype), dv.to(v.dtype), None, None
        dq = _empty_token_major(q.shape, acc, q.device)
        dk = torch.empty(k.shape, dtype=acc, device=k.device) if k.dim() == 3 else \
            _empty_token_major(k.shape, acc, k.device)
        dv = torch.empty(v.shape, dtype=acc, device=v.device) if v.dim() == 3 else \
            _empty_token_major(v.shape, acc, v.device)
        for n, (keys, ranges) in enumerate(bands):
            # The ranges of every band cover each query once: the first band writes dQ, the
            # others add to it. The band's dK and dV are complete after its own ranges.
            dk_band = dv_band = None
            for queries, mask, _ in ranges:
                dq_p, dk_p, dv_p = _flash_backward(
                    grad_out[:, :, queries], q[:, :, queries], kb[:, :, keys], vb[:, :, keys],
                    out[:, :, queries], lse[:, :, queries], 0.0, False, attn_mask=mask, scale=scale)
                if n == 0:
                    dq[:, :, queries] = dq_p
                else:
                    dq[:, :, queries] += dq_p
                # (B, h, band, D), fresh from the kernel: accumulated in place (in float32).
                dk_band = dk_p.to(acc) if dk_band is None else dk_band.add_(dk_p)
                dv_band = dv_p.to(acc) if dv_band is None else dv_band.add_(dv_p)
            # A shared k or v gets one gradient per batch element: its gradient is their sum.
            dk[..., keys, :] = dk_band.sum(0) if k.dim() == 3 else dk_band
            dv[..., keys, :] = dv_band.sum(0) if v.dim() == 3 else dv_band
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# ----------------------------------------------------------------------------------------------
# MLKA on CPUs with native bfloat16: dense 16-bit products, one band of query rows at a time.
# ----------------------------------------------------------------------------------------------
#
# PyTorch's CPU flash kernel runs bfloat16 no faster than float32 (measured: BENCHMARKS.md), while
# oneDNN's bfloat16 matrix products run at several times the float32 rate on CPUs with AVX-512 BF16
# or AMX. So in bfloat16 MLKA is computed as plain attention on bands of query rows of one batch
# element: S = scale Q K^T + mask (one baddbmm, the mask an additive bias over the band's rows), P =
# softmax(S), O = P V, each product in bfloat16 with float32 accumulation inside oneDNN, as autocast
# computes attention. The scores of a band stay in the cache. Backward recomputes P band by band;
# dS = P (dP - rowsum(O dO)) is formed in bfloat16 (dP arrives rounded to bfloat16 from its product,
# so a float32 difference would add only passes over the band, not accuracy); dK and dV accumulate
# in float32.

# Scores per head in a band (queries x L): 256 queries (8 rows) of a 32x32 grid, 64 (one row) of a
# 64x64 grid, measured best on this project's CPU; more leave the cache, fewer make smaller products.
LOW_PRECISION_BAND_SCORES = 1 << 18
LOW_PRECISION_DTYPES = (torch.bfloat16,)


def _low_precision(q: torch.Tensor) -> Optional[torch.dtype]:
    """The 16-bit dtype MLKA computes in on this CPU (q's own, or autocast's for float32 inputs),
    when the CPU has native bfloat16; None otherwise."""
    if q.device.type != "cpu":
        return None
    dtype = q.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in LOW_PRECISION_DTYPES and bf16_supported(q.device) else None


def _dense_bands(plan: "MLKAPlan", dtype) -> Tuple[Tuple[slice, torch.Tensor], ...]:
    """(query tokens, additive mask (band queries, L)) per band of query rows, built once per dtype."""
    key = (dtype, "dense")
    if key not in plan.flash_cache:
        rows = max(1, LOW_PRECISION_BAND_SCORES // (plan.W * plan.H * plan.W))
        bands = []
        for chunk in plan.band_chunks(rows):
            bands.append((plan._tokens(chunk), _window_bias(plan, chunk, slice(0, plan.H), dtype)[1]))
        plan.flash_cache[key] = tuple(bands)
    return plan.flash_cache[key]


def _band_probabilities(q_band, k_t, mask, scale):
    """softmax(scale q k^T + mask): q_band (h, M, D), k_t (h, D, L), mask (M, L) -> (h, M, L)."""
    scores = torch.baddbmm(mask.expand(q_band.shape[0], *mask.shape), q_band, k_t, alpha=scale)
    return torch.softmax(scores, dim=-1)


def _element(t: torch.Tensor, b: int) -> torch.Tensor:
    """Batch element b of a (B, h, L, D) tensor; a shared (h, L, D) tensor is its own element."""
    return t if t.dim() == 3 else t[b]


@_autocast_declared
class _DenseLowPrecisionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        bands = _dense_bands(plan, q.dtype)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for b in range(q.shape[0]):
            k_t, v_b = _element(k, b).transpose(-1, -2), _element(v, b)
            for rows, mask in bands:
                p = _band_probabilities(q[b, :, rows], k_t, mask, scale)
                out[b, :, rows] = torch.bmm(p, v_b)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        bands = _dense_bands(plan, q.dtype)
        grad_out = grad_out.to(q.dtype)
        # rowsum(O dO), (B, h, L, 1), summed in float32 and rounded once, as dP is
        delta = (out.float() * grad_out.float()).sum(-1, keepdim=True).to(q.dtype)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for b in range(q.shape[0]):
            k_b, v_b = _element(k, b), _element(v, b)
            dk_b, dv_b = _element(dk, b), _element(dv, b)
            for rows, mask in bands:
                q_band, do_band = q[b, :, rows], grad_out[b, :, rows]
                p = _band_probabilities(q_band, k_b.transpose(-1, -2), mask, scale)  # (h, M, L)
                dv_b += torch.bmm(p.transpose(-1, -2), do_band)  # dV = P^T dO
                ds = torch.bmm(do_band, v_b.transpose(-1, -2))  # dP = dO V^T
                ds = ds.sub_(delta[b, :, rows]).mul_(p)  # dS = P (dP - delta)
                dk_b += torch.bmm(ds.transpose(-1, -2), q_band).mul_(scale)  # dK = scale dS^T Q
                dq[b, :, rows] = torch.bmm(ds, k_b).mul_(scale)  # dQ = scale dS K
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# ----------------------------------------------------------------------------------------------
# Forward and backward, shared by both ops.
# ----------------------------------------------------------------------------------------------

def _forward(plan: _Plan, q, k, v, scale: float, compute) -> torch.Tensor:
    """The output (B, h, L, D) in q's dtype."""
    b, h = q.shape[:2]
    q = q.contiguous()
    kt, vt = plan.keys_layout(k, compute), plan.keys_layout(v, compute)
    out = torch.empty(q.shape, dtype=compute, device=q.device)
    for c in plan.chunks(h, b):
        p = _probabilities(plan.query_block(q, c, compute, scale), plan.key_block(kt, c), k.dim() == 3, plan, c)
        plan.write_block(out, _rows_times(p, plan.key_block(vt, c), v.dim() == 3), c)
    return out.to(q.dtype)


def _backward(plan: _Plan, q, k, v, out, grad_out, scale: float, compute):
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


@_autocast_declared
class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        compute = _compute_dtype(q.dtype)
        out = _forward(plan, q, k, v, scale, compute)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.scale, ctx.compute = plan, scale, compute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.plan, q, k, v, out, grad_out, ctx.scale, ctx.compute)
        return dq, dk, dv, None, None


def local_cross_attention(q, k, v, grid, window, scale):
    """LCA on checked inputs (see ``rlr_fast.ops``)."""
    plan = _lca_plan(tuple(grid), tuple(window), q.device, _compute_dtype(q.dtype))
    return _BlockedAttention.apply(q, k, v, plan, scale)


def neighbor_masked_attention(q, k, v, grid, window, scale):
    """MLKA on checked inputs (see ``rlr_fast.ops``)."""
    plan = _mlka_plan(tuple(grid), tuple(window), q.device)
    low = _low_precision(q)
    if low is not None:  # (every query has a key: check_inputs refuses a window that covers the grid)
        return _DenseLowPrecisionAttention.apply(q.to(low), k.to(low), v.to(low), plan, scale)
    if q.device.type == "cpu" and _flash_forward is not None and _flash_backward is not None:
        return _FlashComplementAttention.apply(q, k, v, plan, scale)
    return _BlockedAttention.apply(q, k, v, plan, scale)


def backward(op: str, grad_out, out, q, k, v, grid, window, scale):
    """(dq, dk, dv) of either op from its output, on any device: the chunked backward, which
    needs nothing from the forward but ``out`` (the custom op's autograd formula, see
    ``rlr_fast.custom_ops``). A shared k or v gets a shared gradient."""
    compute = _compute_dtype(q.dtype)
    if op == "local_cross_attention":
        plan = _lca_plan(tuple(grid), tuple(window), q.device, compute)
    else:
        plan = _mlka_plan(tuple(grid), tuple(window), q.device)
    return _backward(plan, q, k, v, out, grad_out, scale, compute)
