"""Autotuning of the Triton kernels: which configs of a kernel's space a call may run, and pinning one.

Each kernel is wrapped in ``triton.autotune`` over an explicit list of ``triton.Config`` (tile
sizes, num_warps, num_stages) defined next to it. Before timing anything, Triton's autotuner asks
``prune_configs_by["early_config_prune"]`` which configs to try; here that is `_prune`:

- a config *pinned* with `pin_config` (or the ``RLR_FAST_KERNEL_CONFIG`` environment variable,
  read at import: ``"mlka_fwd=1,dkdv=0"``, indices into the kernel's list) is the only one;
- under ``TRITON_INTERPRET=1`` (no GPU, nothing meaningful to time) only the call's *default*,
  the config chosen per dtype and head dim by compiling every kernel ahead of time without
  spills (`rlr-fast kernels`);
- on a GPU, the default first and then every other config that fits the call.

With one config left, Triton's autotuner runs it without benchmarking (its single-config rule),
so the interpreter and pinned configs never time anything. On a GPU the first call of each key
times the survivors and keeps the fastest for later calls with that key.
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional

import triton

PIN_ENV = "RLR_FAST_KERNEL_CONFIG"
NAMES = ("lca_fwd", "mlka_fwd", "dq", "dkdv", "mlka_dq", "mlka_dkdv", "nearest")


@dataclass
class Candidate:
    """A config of a kernel's space as one call would run it: whether it is the call's default,
    and why it does not fit the call (None if it does)."""
    config: triton.Config
    default: bool
    reason: Optional[str]


@dataclass
class Tuned:
    """A kernel under ``triton.autotune``: the autotuner, and ``candidates(args)``: every config of
    its space for a call with these arguments (by name), in the order of the space."""
    kernel: object
    candidates: Callable


KERNELS = {}


def _parse_pins(text: str) -> dict:
    """``"name=index,..."`` -> {name: index}, names from `NAMES`."""
    pins = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, index = item.partition("=")
        if name.strip() not in NAMES or not index.strip().isdigit():
            raise ValueError(f"{PIN_ENV}: expected name=index with a name from {', '.join(NAMES)}, got {item!r}")
        pins[name.strip()] = int(index)
    return pins


_PINS = _parse_pins(os.environ.get(PIN_ENV, ""))


def pin_config(name: str, index: Optional[int]) -> None:
    """Run config number `index` of kernel `name`'s space on every call from now on (None: autotune
    again). Forgets what the autotuner chose before, so the next call takes the pin."""
    if name not in NAMES:
        raise ValueError(f"unknown kernel {name!r}; choose from {', '.join(NAMES)}")
    if index is None:
        _PINS.pop(name, None)
    else:
        _PINS[name] = index
    if name in KERNELS:
        KERNELS[name].kernel.cache.clear()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuned(name: str, configs: list, key: list, candidates: Callable):
    """Decorator: ``triton.autotune`` of a jitted kernel over `configs`, keyed on the arguments
    `key` (Triton's autotuner adds the dtype of every tensor argument to the key itself), pruned
    per call by `_prune` from ``candidates(args)``."""
    def wrap(fn):
        kernel = triton.autotune(configs=configs, key=key, prune_configs_by={
            "early_config_prune": lambda configs, named_args, **kwargs: _prune(name, {**named_args, **kwargs})})(fn)
        KERNELS[name] = Tuned(kernel, candidates)
        return kernel
    return wrap


def _prune(name: str, args: dict) -> list:
    """The configs a call tries: the pinned one; else the default alone under the interpreter;
    else the default, then the others that fit."""
    candidates = KERNELS[name].candidates(args)
    if name in _PINS:
        if not 0 <= _PINS[name] < len(candidates):
            raise ValueError(f"{name} has configs 0 to {len(candidates) - 1}, {_PINS[name]} is pinned")
        return [candidates[_PINS[name]].config]
    default = [c.config for c in candidates if c.default]
    if interpreting():
        return default
    return default + [c.config for c in candidates if not c.default and c.reason is None]


def default_index(candidates: list) -> int:
    """Position of the default in a kernel's candidates; a default missing from the space is a bug."""
    for i, c in enumerate(candidates):
        if c.default:
            return i
    raise LookupError("the default config is not in the kernel's config space")


def work_per_warp(rows: int, cols: int, depth: int, num_warps: int) -> float:
    """Register pressure, roughly: the elements of a program's (rows x cols) scores and of its
    (rows + cols) x depth operand tiles, per warp."""
    return (rows * cols + (rows + cols) * depth) / num_warps


# Shared memory a config may use for its pipelined loads: an sm_80 SM's 164 KB, less what the
# compiler keeps for layout conversions (configs must run on sm_80 and sm_90)
SMEM_BUDGET = 128 * 1024


def misfit(sides: list, rows: int, cols: int, depth: int, element_bytes: int, config: triton.Config,
           default_pressure: float) -> Optional[str]:
    """Why `config` does not fit a call (None if it does). `sides`: (tile or block side, the
    extent it covers) pairs; `rows` x `cols` the config's scores, `depth` the operands' inner
    dimension; `default_pressure` the default config's `work_per_warp`."""
    if any(side > triton.next_power_of_2(max(extent, 1)) for side, extent in sides):
        return "tile larger than the grid (or key patch) needs"
    if work_per_warp(rows, cols, depth, config.num_warps) > default_pressure:
        return "more work per warp than the default (the largest that compiles without spills)"
    if config.num_stages * cols * depth * element_bytes * 2 > SMEM_BUDGET:
        return "pipeline stages need more shared memory than an sm_80 SM has"
    return None
