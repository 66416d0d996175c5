"""Window geometry on a token grid: the single definition every backend builds on.

A feature map of shape (B, C, H, W) has L = H * W tokens in row-major order, token
``i = y * W + x``. The window of query ``i`` is every key ``j`` with
``|y_i - y_j| <= kh // 2`` and ``|x_i - x_j| <= kw // 2``; it is clipped at the borders
(a corner query has fewer keys), never shifted inward.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple, Union

import torch

Grid = Tuple[int, int]
Window = Tuple[int, int]


def normalize_grid(grid: Union[int, Sequence[int]]) -> Grid:
    """Return ``(H, W)`` from an int or a pair, checking both are positive integers."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    try:
        h, w = (int(g) for g in grid)
        if any(isinstance(g, bool) or int(g) != g for g in grid):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"grid must be an int or a pair (H, W) of ints, got {grid!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must be positive, got (H, W) = ({h}, {w})")
    return h, w


def normalize_window(window: Union[int, Sequence[int]]) -> Window:
    """Return ``(kh, kw)`` from an odd int or a pair of odd ints."""
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, window)
    try:
        kh, kw = window
        if any(isinstance(k, bool) or not isinstance(k, int) for k in (kh, kw)):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"window must be an odd int or a pair (kh, kw) of odd ints, got {window!r}") from None
    if kh <= 0 or kw <= 0 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"window sizes must be odd and positive, got (kh, kw) = ({kh}, {kw})")
    return kh, kw


def complement_is_empty(grid: Grid, window: Window) -> bool:
    """True when some query's window covers the whole grid, leaving it no key outside.

    The centre query of each axis sees the farthest border, so the complement of some
    query is empty exactly when the window reaches every row and every column from the
    most central token: ``kh // 2 >= max distance to a border row`` on both axes.
    """
    (h, w), (kh, kw) = grid, window
    # The query whose farthest row is nearest is the central one: distance ceil((h-1)/2).
    return kh // 2 >= (h - 1) - (h - 1) // 2 and kw // 2 >= (w - 1) - (w - 1) // 2


def in_window(query, key, side: int):
    """The window rule along one axis: whether coordinate ``key`` lies in the window of size
    ``side`` centred on ``query``, ``|query - key| <= side // 2``. Elementwise and broadcasting,
    on tensors or numpy arrays: every backend's mask is built from it."""
    return abs(query - key) <= side // 2


@lru_cache(maxsize=32)
def _window_mask_cpu(grid: Grid, window: Window) -> torch.Tensor:
    (h, w), (kh, kw) = grid, window
    y = torch.arange(h).repeat_interleave(w)
    x = torch.arange(w).repeat(h)
    return in_window(y[:, None], y[None, :], kh) & in_window(x[:, None], x[None, :], kw)


def window_mask(grid: Grid, window: Window, device=None) -> torch.Tensor:
    """Dense boolean (L, L) mask, True where key ``j`` lies in the window of query ``i``."""
    return _window_mask_cpu(tuple(grid), tuple(window)).to(device)
