"""Autocast for the ``torch`` backend's autograd Functions.

Autocast: both Functions run their forward in the autocast state they are called in (under bf16
autocast their products run in bfloat16, softmax and accumulation in float32) and their backward,
which recomputes the probabilities, in that same state wherever backward() is called from, so the
gradient is that of the function the forward computed. Declared with torch.amp.custom_fwd and
custom_bwd for the device of the inputs.
"""
from __future__ import annotations

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_declared(function):
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

