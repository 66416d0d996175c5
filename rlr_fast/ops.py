"""Functional API of the two attention ops and the backend dispatch.

Layout follows ``torch.nn.functional.scaled_dot_product_attention``: ``q`` is
(B, heads, L, D); ``k`` and ``v`` are each either *shared* (heads, L, D), the same for
every batch element and never copied B times, or *batched* (B, heads, L, D).

Backends:
    ``"dense"``      dense L x L masked attention (the oracle: slow, exact; ``"reference"``, its
                     former name, still works and warns once);
    ``"torch"``      memory-efficient blocked attention, any device, the fast CPU path;
    ``"triton"``     fused GPU kernels (``rlr_fast.kernels``), CUDA tensors, or CPU tensors
                     under ``TRITON_INTERPRET=1``;
    ``"auto"``       triton on CUDA, torch elsewhere and where the kernels cannot serve
                     (no triton, float64, an unsupported head dim), with a warning.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from . import blocked, custom_ops, dense, traceable
from .windows import Grid, Window, complement_is_empty, normalize_grid, normalize_window

BACKENDS = ("auto", "dense", "torch", "triton")
# Former names of backends: accepted, with one FutureWarning per process and name.
BACKEND_ALIASES = {"reference": "dense"}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class AttentionProblem:
    """The checked geometry of one call."""

    grid: Grid
    window: Window
    scale: float
    k_shared: bool
    v_shared: bool


def _check_tensor(name: str, t, allowed_dims: Sequence[int]):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in allowed_dims:
        shapes = " or ".join({3: "(heads, L, D)", 4: "(B, heads, L, D)"}[d] for d in allowed_dims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")


def check_inputs(q, k, v, grid, window, scale, *, complement: bool) -> AttentionProblem:
    """Validate one call and return its geometry; raises ValueError/TypeError naming the problem."""
    _check_tensor("q", q, (4,))
    _check_tensor("k", k, (3, 4))
    _check_tensor("v", v, (3, 4))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"dtype mismatch: q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"device mismatch: q is on {q.device} but {name} is on {t.device}")
    b, heads, length, dim = q.shape
    for name, t in (("k", k), ("v", v)):
        t_heads, t_len, t_dim = t.shape[-3:]
        if t.dim() == 4 and t.shape[0] != b:
            raise ValueError(f"batch mismatch: q has batch {b} but {name} has batch {t.shape[0]} "
                             f"(pass a shared {name} as (heads, L, D) without a batch dimension)")
        if t_heads != heads:
            raise ValueError(f"heads mismatch: q has {heads} heads but {name} has {t_heads}")
        if t_len != length:
            raise ValueError(f"length mismatch: q has L={length} tokens but {name} has {t_len}")
        if t_dim != dim:
            raise ValueError(f"head dim mismatch: q has D={dim} but {name} has {t_dim}")
    h, w = normalize_grid(grid)
    if h * w != length:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but the inputs have L={length}")
    kh, kw = normalize_window(window)
    if complement and complement_is_empty((h, w), (kh, kw)):
        raise ValueError(
            f"window {kh}x{kw} covers the whole {h}x{w} grid for some query, which would be left "
            f"with no key outside its window; use a smaller window or a larger grid")
    if scale is None:
        scale = dim ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return AttentionProblem((h, w), (kh, kw), float(scale), k.dim() == 3, v.dim() == 3)


def _triton_unavailable(device: torch.device, dtype: Optional[torch.dtype],
                        head_dim: Optional[int]) -> Optional[Exception]:
    """Why the Triton kernels cannot serve a call on `device`, as the error to raise (None if
    they can). `dtype` and `head_dim` are checked when given."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return ValueError(f"backend 'triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                          f"to run the kernels on the CPU for testing")
    if importlib.util.find_spec("triton") is None:
        return ImportError("the triton backend needs the triton package, which is not installed")
    from .kernels.window_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return TypeError(f"the triton backend supports float32, float16 and bfloat16, not {dtype}")
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        return ValueError(f"the triton backend supports head dims {SUPPORTED_HEAD_DIMS}, got D={head_dim}")
    return None


_warned = set()  # the fallback reasons `auto` has already reported


def canonical_backend(backend: str) -> str:
    """The backend's current name: a name of BACKENDS as is, a former name (BACKEND_ALIASES) mapped
    to its new one with one FutureWarning per process; anything else is refused, naming the choices."""
    if backend in BACKEND_ALIASES:
        new = BACKEND_ALIASES[backend]
        if ("alias", backend) not in _warned:
            _warned.add(("alias", backend))
            warnings.warn(f"backend {backend!r} is now called {new!r} (the dense oracle, not RLR's learnable "
                          f"reference); {backend!r} will be removed", FutureWarning, stacklevel=4)
        return new
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                    head_dim: Optional[int] = None) -> str:
    """Map ``"auto"`` to a concrete backend and check the choice fits the call.

    ``auto`` is triton on CUDA and torch elsewhere; on CUDA it falls back to torch where the
    kernels cannot serve (no triton, float64, a head dim they do not take), with one warning per
    reason. ``triton`` raises there instead, naming the problem."""
    backend = canonical_backend(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        problem = _triton_unavailable(device, dtype, head_dim)
        if problem is None:
            return "triton"
        if str(problem) not in _warned:
            _warned.add(str(problem))
            warnings.warn(f"backend 'auto' uses 'torch' here: {problem}", RuntimeWarning, stacklevel=4)
        return "torch"
    if backend == "triton":
        problem = _triton_unavailable(device, dtype, head_dim)
        if problem is not None:
            raise type(problem)(f"{problem}; use backend='torch'")
    return backend


def _run(op: str, q, k, v, grid, window, scale, backend):
    """The chosen backend's eager call on checked inputs."""
    if backend == "dense":
        fn = getattr(dense, op)
    elif backend == "torch":
        fn = getattr(blocked, op)
    else:
        from . import kernels  # imported lazily: triton is only needed here
        fn = getattr(kernels, op)
    return fn(q, k, v, grid, window, scale)


# Under torch.compile the torch and triton backends run as custom ops (rlr_fast::<op>, returning
# (out, lse)), opaque to the compiler; their backward is the Triton kernels' with the triton backend
# (from the saved log-sum-exp), the torch backend's chunked backward with the torch backend.
_CUSTOM_OPS = {
    op: custom_ops.attention_op(op, functools.partial(_run, op), functools.partial(blocked.backward, op))
    for op in ("local_cross_attention", "neighbor_masked_attention")
}


def _dispatch(op: str, q, k, v, grid, window, scale, backend):
    complement = op == "neighbor_masked_attention"
    p = check_inputs(q, k, v, grid, window, scale, complement=complement)
    backend = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if traceable.tracing_for_export():  # torch.jit.trace, torch.export, the ONNX exporters
        return getattr(traceable, op)(q, k, v, p.grid, p.window, p.scale)
    if torch.compiler.is_compiling() and backend != "dense":
        return _CUSTOM_OPS[op](q, k, v, list(p.grid), list(p.window), p.scale, backend)[0]
    return _run(op, q, k, v, p.grid, p.window, p.scale, backend)


def local_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          grid: Union[int, Sequence[int]], window: Union[int, Sequence[int]], *,
                          scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Local cross attention (LCA): each query attends only to the keys in its window.

    ``out_i = sum_{j in window(i)} softmax_j(scale * q_i . k_j) v_j`` with the window clipped
    at the grid borders. Returns (B, heads, L, D) in the dtype of ``q``.
    """
    return _dispatch("local_cross_attention", q, k, v, grid, window, scale, backend)


def neighbor_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              grid: Union[int, Sequence[int]], window: Union[int, Sequence[int]], *,
                              scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Neighbour-masked attention (MLKA in RLR, UniAD's neighbour mask): each query attends to
    every key *outside* its window.

    Raises ValueError before any compute if the window leaves some query without a key.
    Returns (B, heads, L, D) in the dtype of ``q``.
    """
    return _dispatch("neighbor_masked_attention", q, k, v, grid, window, scale, backend)


NEAREST_EPS = 1e-12
NEAREST_METRICS = ("cosine", "l2")


def check_nearest_inputs(x, ref, metric: str = "cosine") -> None:
    """Validate a :func:`nearest_reference` call; raises ValueError/TypeError naming the problem."""
    if metric not in NEAREST_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(NEAREST_METRICS)}")
    for name, t, dims in (("x", x, (3,)), ("ref", ref, (2, 3))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in dims:
            want = "(B, N, C)" if name == "x" else "(M, C) or (B, M, C)"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")
    if ref.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but ref is {ref.dtype}")
    if ref.device != x.device:
        raise ValueError(f"device mismatch: x is on {x.device} but ref is on {ref.device}")
    if ref.shape[-1] != x.shape[-1]:
        raise ValueError(f"channel mismatch: x has C={x.shape[-1]} but ref has C={ref.shape[-1]}")
    if ref.dim() == 3 and ref.shape[0] != x.shape[0]:
        raise ValueError(f"batch mismatch: x has batch {x.shape[0]} but ref has batch {ref.shape[0]} "
                         f"(pass a shared ref as (M, C) without a batch dimension)")
    if ref.shape[-2] == 0:
        raise ValueError("ref has no tokens (M = 0): there is nothing to be nearest to")
    if x.shape[-1] == 0:
        raise ValueError("x and ref have no channels (C = 0): there is nothing to compare")


def nearest_reference(x: torch.Tensor, ref: torch.Tensor, *, metric: str = "cosine", backend: str = "auto"):
    """Each token's nearest reference token: ``(index, similarity)`` for ``metric="cosine"`` (the
    most cosine-similar row), ``(index, distance)`` for ``metric="l2"`` (the row at the smallest
    Euclidean distance); each (B, N).

    ``x`` is (B, N, C); ``ref`` is (M, C), shared by the batch and never copied B times, or
    batched (B, M, C). ``index`` (int64) points into ref's M tokens; ties go to the lowest index
    in every backend. The similarity or distance is float32 (float64 for float64 inputs):
    products and accumulation run in float32 whatever the input dtype. Cosine: rows are
    normalised as ``v / max(||v||, 1e-12)``, so an all-zero token or reference row has
    similarity 0 with everything (an all-zero token therefore gets index 0). L2: both metrics are
    the argmax over rows m of ``a_m (x . r_m) + b_m`` (cosine: ``a_m = 1 / ||r_m||``, ``b_m = 0``;
    l2: ``a_m = 1``, ``b_m = -||r_m||^2 / 2``), and the distance is
    ``sqrt(max(||x||^2 - 2 max, 0))``: float32 rounding of that difference leaves a token that
    equals a reference row at a distance of about ``sqrt(eps_fp32) * ||x||`` rather than 0.
    The outputs carry no gradient.

    Backends: ``dense`` (dense B x N x M scores, the oracle), ``torch`` (chunked, memory
    O(B*N + tile)), ``triton`` (one fused GPU kernel), ``auto`` (triton on CUDA, torch elsewhere).
    While a model is traced for export, the search runs as plain tensor operations over chunks of
    the reference rows (``rlr_fast.traceable``).
    """
    check_nearest_inputs(x, ref, metric)
    backend = resolve_backend(backend, x.device, x.dtype)
    if traceable.tracing_for_export():  # torch.jit.trace, torch.export, the ONNX exporters
        with torch.no_grad():
            return traceable.nearest_reference(x, ref, NEAREST_EPS, metric)
    if torch.compiler.is_compiling() and backend != "dense":
        return _NEAREST_OP(x, ref, backend, metric)
    return _run_nearest(x, ref, metric, backend)


def _run_nearest(x, ref, metric: str, backend: str):
    """The chosen backend's eager call of nearest_reference on checked inputs."""
    if backend == "dense":
        with torch.no_grad():
            return dense.nearest_reference(x, ref, NEAREST_EPS, metric)
    if backend == "torch":
        from . import nearest
        return nearest.nearest_reference(x, ref, NEAREST_EPS, metric)
    from .kernels.nearest_reference import nearest_reference as fused  # triton needed only here
    return fused(x, ref, NEAREST_EPS, metric)


def _nearest_forward(x: torch.Tensor, ref: torch.Tensor, backend: str,
                     metric: str = "cosine") -> Tuple[torch.Tensor, torch.Tensor]:
    index, value = _run_nearest(x, ref, metric, backend)
    return index.contiguous(), value.contiguous()


def _nearest_fake(x, ref, backend, metric="cosine"):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[:2], dtype=torch.int64), x.new_empty(x.shape[:2], dtype=compute)


# Under torch.compile: one opaque node, no gradient (as in eager). The metric comes last, with
# its default, so the op's schema of before the metric existed still calls it.
_NEAREST_OP = custom_ops.register("nearest_reference", _nearest_forward, _nearest_fake)
