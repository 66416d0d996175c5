"""Building blocks shared by the models: positional embedding, feature jitter, Gaussian blur."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_pos_embed_2d(grid, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine positional embedding (L, dim) of an (H, W) grid, row-major tokens.

    With half = dim/2 and freq = exp(arange(0, half, 2) * -ln(1e4) / half): channels [0:half:2]
    = sin(x freq), [1:half:2] = cos(x freq), [half::2] = sin(y freq), [half+1::2] = cos(y freq).
    """
    if dim % 4:
        raise ValueError(f"the positional embedding needs a dimension divisible by 4, got {dim}")
    h, w = grid
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half))
    y = torch.arange(h, dtype=torch.float64).repeat_interleave(w)[:, None]
    x = torch.arange(w, dtype=torch.float64).repeat(h)[:, None]
    pe = torch.empty(h * w, dim, dtype=torch.float64)
    pe[:, 0:half:2], pe[:, 1:half:2] = torch.sin(x * freq), torch.cos(x * freq)
    pe[:, half::2], pe[:, half + 1::2] = torch.sin(y * freq), torch.cos(y * freq)
    return pe.float()


def feature_jitter(tokens: torch.Tensor, scale: float, prob: float = 1.0) -> torch.Tensor:
    """tokens (B, L, C) + N(0, 1) * (||token||_2 / C) * scale, on each token with probability `prob`."""
    if scale <= 0 or prob <= 0:
        return tokens
    c = tokens.shape[-1]
    noise = torch.randn_like(tokens) * (tokens.norm(dim=-1, keepdim=True) / c * scale)
    if prob < 1:
        noise = noise * (torch.rand(tokens.shape[:-1], device=tokens.device) < prob).unsqueeze(-1)
    return tokens + noise


def _symmetric_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by `radius` as scipy's mode 'reflect' (d c b a | a b c d)."""
    i = torch.remainder(torch.arange(-radius, n + radius, device=device), 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _taps(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    """scipy's Gaussian kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


# The largest side blurred by matrix products; a longer one (a map of more than 1024 pixels a side)
# is blurred by 1-D convolutions, whose cost per pixel does not grow with the side.
BLUR_MATRIX_MAX = 1024


def _band_matrix(n: int, taps: torch.Tensor) -> torch.Tensor:
    """The (n, n + 2r) matrix T with T[i, i + t] = taps[t] (2r + 1 taps): the filter of a length-n
    axis padded by r on either side. Built by repeating [taps, 0 ... 0] (length n + 2r + 1) and
    cutting it into rows of n + 2r, each row starting one place later: only repeat, slice and
    view, so torch.compile, tracing and both ONNX exporters see plain tensor ops."""
    width = taps.numel()
    length = n + width - 1
    row = torch.cat([taps, taps.new_zeros(length - width + 1)])
    return row.repeat(n)[: n * length].view(n, length)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter of (B, 1, H, W) maps, as scipy.ndimage.gaussian_filter
    (radius int(truncate * sigma + 0.5), mode 'reflect'), on any device.

    Each axis is reflect-padded (a gather) and filtered by one matrix product with its band
    matrix: on a CPU about seven times faster at 256 px than 1-D convolutions of one channel
    (BENCHMARKS.md, "Where the time goes"); maps wider than ``BLUR_MATRIX_MAX`` take the
    convolutions."""
    if sigma <= 0:
        return maps
    b, c, h, w = maps.shape
    if max(h, w) > BLUR_MATRIX_MAX:
        return _gaussian_blur_conv(maps, sigma, truncate)
    taps = _taps(sigma, truncate, maps.dtype, maps.device)
    radius = taps.numel() // 2
    out = maps.reshape(b * c, h, w)
    out = torch.matmul(_band_matrix(h, taps), out.index_select(1, _symmetric_index(h, radius, maps.device)))
    out = torch.matmul(out.index_select(2, _symmetric_index(w, radius, maps.device)), _band_matrix(w, taps).t())
    return out.view(b, c, h, w)


def _gaussian_blur_conv(maps: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    """gaussian_blur by 1-D convolutions over reflect-padded copies (for axes too long for a matrix)."""
    kernel = _taps(sigma, truncate, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    b, c, h, w = maps.shape
    out = maps.index_select(2, _symmetric_index(h, radius, maps.device))
    out = F.conv2d(out.reshape(b * c, 1, h + 2 * radius, w), kernel.view(1, 1, -1, 1))
    out = out.index_select(3, _symmetric_index(w, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return out.view(b, c, h, w)
