"""The ops as ``torch.library`` custom ops, so that ``torch.compile`` sees each as one node.

The backends run Python control flow, cached plans, private PyTorch kernels and Triton launches
that Dynamo cannot (and should not) trace through. Registered as custom ops with a fake
implementation (shapes only) and an autograd formula, each op is opaque to the compiler:
``torch.compile(model, fullgraph=True)`` traces a model that uses them without graph breaks,
and ``torch.library.opcheck`` checks the registration.

:func:`register` is generic: an op is its forward function (type-annotated, tensors first,
as ``torch.library.custom_op`` requires), a fake function and a backward function that returns
the gradient of every tensor input from ``(grad_out, out, *inputs)``. The backward is itself a
custom op (``<name>_backward``), so a compiled training step stays one graph too.
``rlr_fast.ops`` registers the two attention ops with :func:`attention_op` (which also returns
the forward's log-sum-exp, so that the Triton backward serves compiled training) and
``nearest_reference`` (no gradient) with :func:`register`.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

NAMESPACE = "rlr_fast"


def _dense(t: Tensor) -> Tensor:
    """Outputs in the contiguous layout the fake functions promise (backends may return views
    of another memory layout, e.g. PyTorch's flash kernel)."""
    return t.contiguous()


def register(name: str, forward: Callable, fake: Callable, backward: Optional[Callable] = None):
    """Register ``forward`` as the custom op ``rlr_fast::<name>`` with its fake and autograd.

    ``forward(*tensors, *static_args)`` carries type annotations and returns fresh contiguous
    tensors; ``fake`` takes the same arguments and returns empty tensors of the outputs' shapes,
    dtypes and devices. ``backward(grad_out, out, *tensors, *static_args)``, for an op with one
    output, returns one gradient per tensor input, shaped as that input (a shared k or v gets a
    shared gradient); without it the op has no gradient. Returns the op.
    """
    params = list(inspect.signature(forward).parameters.values())
    n_tensors = next((i for i, p in enumerate(params) if p.annotation not in (Tensor, "Tensor")), len(params))
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
    op.register_fake(fake)
    if backward is None:
        return op

    schema = torch.library.infer_schema(forward, mutates_args=())
    arguments = schema[schema.index("(") + 1: schema.rindex(") ->")]

    def backward_impl(grad_out, out, *inputs) -> List[Tensor]:
        return [_dense(g) for g in backward(grad_out, out, *inputs)]

    def backward_fake(grad_out, out, *inputs) -> List[Tensor]:
        return [t.new_empty(t.shape) for t in inputs[:n_tensors]]

    backward_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward", backward_impl, mutates_args=(),
        schema=f"(Tensor grad_out, Tensor out, {arguments}) -> Tensor[]")
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors], output)
        ctx.static_args = inputs[n_tensors:]

    def autograd_backward(ctx, grad_out):
        *tensors, out = ctx.saved_tensors
        grads = backward_op(grad_out.contiguous(), out, *tensors, *ctx.static_args)
        return (*grads, *(None for _ in ctx.static_args))

    op.register_autograd(autograd_backward, setup_context=setup_context)
    return op


class _SavedContext:
    """What an autograd Function's ``forward`` and ``backward`` read and write on ``ctx``, so that the
    Triton Function's own code runs outside autograd: the custom op's forward and its backward."""

    def __init__(self, saved=(), geometry=None):
        self.saved_tensors, self.geometry = tuple(saved), geometry

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _triton_function(name: str):
    """The Triton autograd Function of op `name` (``rlr_fast.kernels``, imported lazily)."""
    if name == "local_cross_attention":
        from .kernels.local_cross_attention import LocalCrossAttentionFunction as function
    else:
        from .kernels.neighbor_masked_attention import NeighborMaskedAttentionFunction as function
    return function


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_forward(name: str, q, k, v, grid, window, scale):
    """The Triton forward of op `name`: (out (B, H, L, D), the row log-sum-exp in base 2 of the
    scaled scores, float32 (B * H * L,)), as the Triton Function computes and saves them."""
    ctx = _SavedContext()
    out = _triton_function(name).forward(ctx, _unit_last(q), _unit_last(k), _unit_last(v), tuple(grid),
                                         tuple(window), float(scale))
    return out, ctx.saved_tensors[4]


def triton_backward(name: str, grad_out, out, lse, q, k, v, grid, window, scale):
    """The Triton backward of op `name` from the forward's out and log-sum-exp: (dq, dk, dv), the
    dQ and dK/dV kernels and their torch glue, as the Triton Function's backward runs them."""
    radius = (window[0] // 2, window[1] // 2)
    ctx = _SavedContext((_unit_last(q), _unit_last(k), _unit_last(v), out, lse), (tuple(grid), radius, float(scale)))
    return _triton_function(name).backward(ctx, grad_out)[:3]


def attention_op(name: str, run: Callable, backward: Callable):
    """Register one attention op, ``rlr_fast::<name>``: ``run(q, k, v, grid, window, scale, backend)``
    is the eager call of the chosen backend, ``backward(grad_out, out, q, k, v, grid, window, scale)``
    gives (dq, dk, dv) by the torch backend's chunked backward. k and v pass through as they are,
    so a shared one stays shared.

    The op returns (out, lse): with ``backend="triton"`` lse is the forward's row log-sum-exp
    (float32, B * H * L), which the op saves for its backward, ``rlr_fast::<name>_triton_backward``
    (the Triton dQ and dK/dV kernels, as eager autograd runs them); with the other backends lse is
    empty and the backward is ``rlr_fast::<name>_backward`` (the chunked torch backward). Under
    ``torch.compile`` a compiled training step on CUDA therefore runs the Triton backward."""

    def forward(q: Tensor, k: Tensor, v: Tensor, grid: List[int], window: List[int], scale: float,
                backend: str) -> Tuple[Tensor, Tensor]:
        if backend == "triton":
            out, lse = triton_forward(name, q, k, v, grid, window, scale)
            return _dense(out), lse
        return _dense(run(q, k, v, tuple(grid), tuple(window), scale, backend)), q.new_empty(0, dtype=torch.float32)

    def fake(q, k, v, grid, window, scale, backend):
        rows = q.shape[0] * q.shape[1] * q.shape[2] if backend == "triton" else 0
        return q.new_empty(q.shape), q.new_empty(rows, dtype=torch.float32)

    forward.__name__ = name
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
    op.register_fake(fake)

    def chunked(grad_out: Tensor, out: Tensor, q: Tensor, k: Tensor, v: Tensor, grid: List[int],
                window: List[int], scale: float) -> List[Tensor]:
        return [_dense(g) for g in backward(grad_out, out, q, k, v, tuple(grid), tuple(window), scale)]

    def fused(grad_out: Tensor, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, grid: List[int],
              window: List[int], scale: float) -> List[Tensor]:
        return [_dense(g) for g in triton_backward(name, grad_out, out, lse, q, k, v, grid, window, scale)]

    def grads_fake(grad_out, out, *rest):
        q, k, v = [t for t in rest if isinstance(t, Tensor)][-3:]
        return [t.new_empty(t.shape) for t in (q, k, v)]

    chunked_op = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", chunked, mutates_args=())
    chunked_op.register_fake(grads_fake)
    fused_op = torch.library.custom_op(f"{NAMESPACE}::{name}_triton_backward", fused, mutates_args=())
    fused_op.register_fake(grads_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, grid, window, scale, backend = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.static_args, ctx.backend = (grid, window, scale), backend

    def autograd_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.backend == "triton":
            grads = fused_op(grad_out, out, lse, q, k, v, *ctx.static_args)
        else:
            grads = chunked_op(grad_out, out, q, k, v, *ctx.static_args)
        return (*grads, None, None, None, None)

    op.register_autograd(autograd_backward, setup_context=setup_context)
    return op
