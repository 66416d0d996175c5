"""The Triton kernels keep their own window arithmetic (kernels/window_attention.py: ``_visible``,
``_patch``, ``_needs_mask``, in grid coordinates with radii RY = kh // 2, RX = kw // 2); these
tests run those very helpers in small Triton kernels (in Triton's interpreter when there is no GPU)
and check them against the one window rule, ``rlr_fast.windows.in_window``, by brute force over
every token pair, tile and block of small grids."""
import itertools
import os

import pytest
import torch
import triton
import triton.language as tl

from rlr_fast.kernels import window_attention as wa
from rlr_fast.windows import in_window, window_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")

_visible, _patch, _needs_mask = wa._visible, wa._patch, wa._needs_mask
TOKENS = 64  # a power of two above every grid below
GRIDS = [(5, 7), (6, 6), (8, 3), (3, 8)]
WINDOWS = [(1, 1), (3, 3), (5, 3), (1, 5), (7, 5)]
TILE, BLOCK = (2, 4), (4, 2)


@triton.jit
def _visible_kernel(out_ptr, GRID_H, GRID_W, RY, RX, N: tl.constexpr, COMPLEMENT: tl.constexpr):
    # every token a (rows) against every token b (columns); tokens past the grid are not on it
    t = tl.arange(0, N)
    on_grid = t < GRID_H * GRID_W
    ty, tx = t // GRID_W, t % GRID_W
    visible = _visible(ty, tx, on_grid, ty, tx, on_grid, RY, RX, COMPLEMENT)
    tl.store(out_ptr + t[:, None] * N + t[None, :], visible.to(tl.int8))


@triton.jit
def _tiles_kernel(patch_ptr, needs_ptr, GRID_H, GRID_W, RY, RX, N_BLOCKS_X,
                  TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                  COMPLEMENT: tl.constexpr):
    # program (tile, block): the tile's patch, and whether the block at that index needs the mask
    tile = tl.program_id(0)
    block = tl.program_id(1)
    n_tiles_x = tl.cdiv(GRID_W, TILE_W)
    y0, x0 = (tile // n_tiles_x) * TILE_H, (tile % n_tiles_x) * TILE_W
    y_lo, y_hi, x_lo, x_hi = _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H, TILE_W)
    if block == 0:
        tl.store(patch_ptr + tile * 4 + 0, y_lo)
        tl.store(patch_ptr + tile * 4 + 1, y_hi)
        tl.store(patch_ptr + tile * 4 + 2, x_lo)
        tl.store(patch_ptr + tile * 4 + 3, x_hi)
    by, bx = (block // N_BLOCKS_X) * BLOCK_H, (block % N_BLOCKS_X) * BLOCK_W
    needs = _needs_mask(by, bx, y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, COMPLEMENT)
    tl.store(needs_ptr + tile * tl.num_programs(1) + block, needs.to(tl.int8))


def _in_window_2d(a, b, window):
    """in_window on both axes of grid points a = (y, x) and b."""
    return bool(in_window(a[0], b[0], window[0])) and bool(in_window(a[1], b[1], window[1]))


@pytest.mark.parametrize("complement", [False, True])
@pytest.mark.parametrize("grid,window", list(itertools.product(GRIDS, WINDOWS)))
def test_visible_is_the_window_rule(grid, window, complement):
    """LCA sees the window of in_window, MLKA its complement, and no token off the grid is seen."""
    out = torch.full((TOKENS, TOKENS), -1, dtype=torch.int8, device=DEVICE)
    _visible_kernel[(1,)](out, grid[0], grid[1], window[0] // 2, window[1] // 2, N=TOKENS, COMPLEMENT=complement)
    out = out.cpu().bool()
    n = grid[0] * grid[1]
    rule = window_mask(grid, window).cpu()
    assert torch.equal(out[:n, :n], ~rule if complement else rule)
    assert not out[n:].any() and not out[:, n:].any()


@pytest.mark.parametrize("complement", [False, True])
@pytest.mark.parametrize("grid,window", list(itertools.product(GRIDS, WINDOWS)))
def test_patches_and_unmasked_blocks_follow_the_window_rule(grid, window, complement):
    """A tile's patch holds exactly the grid tokens inside some tile token's window; a block
    the kernels run without the mask (MLKA only) lies on the grid with no pair inside a window."""
    (h, w), (th, tw), (bh, bw) = grid, TILE, BLOCK
    tiles_x, blocks_x = -(-w // tw), -(-w // bw)
    n_tiles, n_blocks = -(-h // th) * tiles_x, -(-h // bh) * blocks_x
    patch = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    needs = torch.full((n_tiles, n_blocks), -1, dtype=torch.int8, device=DEVICE)
    _tiles_kernel[(n_tiles, n_blocks)](patch, needs, h, w, window[0] // 2, window[1] // 2, blocks_x,
                                       TILE_H=th, TILE_W=tw, BLOCK_H=bh, BLOCK_W=bw, COMPLEMENT=complement)
    patch, needs = patch.cpu(), needs.cpu()
    grid_points = [(y, x) for y in range(h) for x in range(w)]
    for tile in range(n_tiles):
        y0, x0 = (tile // tiles_x) * th, (tile % tiles_x) * tw
        tile_points = [(y, x) for y in range(y0, y0 + th) for x in range(x0, x0 + tw)]
        reached = {p for p in grid_points if any(_in_window_2d(t, p, window) for t in tile_points)}
        y_lo, y_hi, x_lo, x_hi = patch[tile].tolist()
        assert reached == {(y, x) for y in range(y_lo, y_hi) for x in range(x_lo, x_hi)}, (tile, patch[tile])
        for block in range(n_blocks):
            if needs[tile, block]:
                continue
            assert complement, "LCA masks every block"
            by, bx = (block // blocks_x) * bh, (block % blocks_x) * bw
            block_points = [(y, x) for y in range(by, by + bh) for x in range(bx, bx + bw)]
            assert all(y < h and x < w for y, x in block_points), (tile, block)
            assert not any(_in_window_2d(t, b, window) for t in tile_points for b in block_points), (tile, block)
