"""Where a model's time goes: a breakdown of one inference call or training step by part.

``breakdown(model, step)`` runs ``step()`` once under ``torch.profiler`` and splits its CPU time
into the parts users ask about:

    backbone      the frozen backbone (features)
    LCA, MLKA     the two attention ops themselves (not their projections)
    linear + FFN  every other matrix product of the reconstruction: q/k/v/out projections,
                  embeddings, the FFN (with its GELU), the output head
    LayerNorm     the layer norms
    score map     turning reconstructions into maps and scores (errors, upsampling, blur, max)
    other         everything else (reshapes, additions, the loss, the optimizer, ...)

How: while profiling, the backbone, each level's network, the score-map code and the two ops
run inside named ``record_function`` ranges (the classes' methods are wrapped for the duration of
the call and restored after). Each profiled event's *self* time goes to the innermost range
around it; inside a level's network, an operator outside the attention ranges is sorted by its
name (linear algebra, layer norm, the rest). A backward operator carries the sequence number of
the forward operator that created it, so backward time goes to the same part as its forward.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Dict

from torch.profiler import ProfilerActivity, profile, record_function

PARTS = ("backbone", "LCA", "MLKA", "linear + FFN", "LayerNorm", "score map", "other")
_PREFIX = "rlr_fast.part::"
_RECONSTRUCTION = "reconstruction"  # a range whose operators are sorted by name
_LINEAR = ("linear", "addmm", "mm", "bmm", "matmul", "gelu", "baddbmm")
_NORM = ("layer_norm",)


def _op_part(name: str) -> str:
    """The part of an operator inside a reconstruction network, by its name."""
    base = name.split("::")[-1].split(": ")[-1].lower()  # "aten::addmm", "...: AddmmBackward0"
    base = base.removesuffix("backward0").removesuffix("backward").lstrip("_")
    if base.startswith(_NORM) or base.startswith("native_layer_norm") or base.startswith("nativelayernorm"):
        return "LayerNorm"
    if base in _LINEAR or base.startswith(("addmm", "mm", "gelu", "linear", "bmm", "matmul")):
        return "linear + FFN"
    return "other"


def _wrap(obj, attr: str, label: str, stack: contextlib.ExitStack) -> None:
    """Run ``obj.attr`` inside a profiler range named ``label`` until ``stack`` closes.

    A class's static method (the modules' ``_op``) is replaced and put back; a bound method of
    an instance (``forward``) is shadowed by an instance attribute that is deleted after."""
    if isinstance(obj, type):
        original = obj.__dict__[attr]
        fn = original.__func__

        def labelled(*args, **kwargs):
            with record_function(_PREFIX + label):
                return fn(*args, **kwargs)

        setattr(obj, attr, staticmethod(labelled))
        stack.callback(setattr, obj, attr, original)
        return
    bound = getattr(obj, attr)

    def labelled_method(*args, **kwargs):
        with record_function(_PREFIX + label):
            return bound(*args, **kwargs)

    setattr(obj, attr, labelled_method)
    stack.callback(delattr, obj, attr)


@contextlib.contextmanager
def _labelled(model):
    """Name the parts of ``model`` for the profiler while the context is open."""
    from .modules import LocalCrossAttention, NeighborMaskedAttention

    with contextlib.ExitStack() as stack:
        _wrap(LocalCrossAttention, "_op", "LCA", stack)
        _wrap(NeighborMaskedAttention, "_op", "MLKA", stack)
        if hasattr(model, "backbone"):
            _wrap(model.backbone, "forward", "backbone", stack)
        if hasattr(model, "predict_features"):
            _wrap(model, "predict_features", "score map", stack)
        for net in _reconstruction_modules(model):
            _wrap(net, "forward", _RECONSTRUCTION, stack)
        yield


def _reconstruction_modules(model):
    """The trained networks: RLR's per-level networks, or UniAD's transformer."""
    if hasattr(model, "levels"):
        return list(model.levels)
    if hasattr(model, "transformer"):
        return [model.transformer]
    return []


def _label(event) -> str | None:
    return event.name[len(_PREFIX):] if event.name.startswith(_PREFIX) else None


def breakdown(model, step: Callable[[], object]) -> Dict[str, float]:
    """Seconds of ``step()``'s CPU time per part (``PARTS``) plus ``"total"``, the step's wall time.

    ``step`` is run once under the profiler (run it once before to leave out one-time costs).
    Parts sum to about the total: the profiler adds a little time per operator.
    """
    with _labelled(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    events = prof.events()
    part_of: Dict[int, str] = {}  # id(event) -> part
    forward_part: Dict[int, str] = {}  # sequence number -> part, from forward operators

    def resolve(event) -> str:
        key = id(event)
        if key in part_of:
            return part_of[key]
        label = _label(event)
        parent = event.cpu_parent
        if label is not None and label != _RECONSTRUCTION:
            part = label
        elif label == _RECONSTRUCTION:
            part = _RECONSTRUCTION
        elif parent is None:  # a top-level operator: backward ones follow their forward
            part = "other"
            if event.name.startswith("autograd::engine::evaluate_function"):
                part = forward_part.get(event.sequence_nr, "other")
        else:
            part = resolve(parent)
            if part == _RECONSTRUCTION:  # the outermost operator under the network names the part
                part = _op_part(event.name)
        part_of[key] = part
        return part

    ordered = sorted(events, key=lambda e: e.time_range.start)
    for e in ordered:  # forward operators first in time: fill the sequence-number map
        if not e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr >= 0:
            forward_part.setdefault(e.sequence_nr, resolve(e))
    seconds = defaultdict(float)
    for e in ordered:
        part = resolve(e)
        seconds["other" if part == _RECONSTRUCTION else part] += e.self_cpu_time_total / 1e6
    out = {p: seconds.get(p, 0.0) for p in PARTS}
    out["total"] = total
    return out
