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
``rlr_fast.ops`` registers the two attention ops with :func:`attention_op` and
``nearest_reference`` (no gradient) with :func:`register`.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional

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


def attention_op(name: str, run: Callable, backward: Callable):
    """Register one attention op: ``run(q, k, v, grid, window, scale, backend)`` is the eager
    call of the chosen backend, ``backward(grad_out, out, q, k, v, grid, window, scale)``
    gives (dq, dk, dv). k and v pass through as they are, so a shared one stays shared."""

    def forward(q: Tensor, k: Tensor, v: Tensor, grid: List[int], window: List[int], scale: float,
                backend: str) -> Tensor:
        return _dense(run(q, k, v, tuple(grid), tuple(window), scale, backend))

    def fake(q, k, v, grid, window, scale, backend):
        return q.new_empty(q.shape)

    def grads(grad_out, out, q, k, v, grid, window, scale, backend):
        return backward(grad_out, out, q, k, v, tuple(grid), tuple(window), scale)

    forward.__name__ = name
    return register(name, forward, fake, grads)
