"""Autotuning of the Triton kernels: which configs of a kernel's space a call may run, and pinning one.

Each kernel is wrapped in ``triton.autotune`` over an explicit list of ``triton.Config`` (tile
sizes, num_warps, num_stages) defined next to it. Before timing anything, Triton's autotuner asks
``prune_configs_by["early_config_prune"]`` which configs to try; here that is `_prune`:

- a config *pinned* with `pin_config` (or the ``RLR_FAST_KERNEL_CONFIG`` environment variable,
  read at import: ``"mlka_fwd=1,dkdv=0"``, indices into the kernel's list) is the only one;
- under ``TRITON_INTERPRET=1`` (no GPU, nothing meaningful to time) only the call's *default*,
  the config chosen per dtype and head dim by compiling every kernel ahead of time without
  spills (`rlr-fast kernels`);
- with ``RLR_FAST_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``, also only the
  default: a fixed config per call, so results are bitwise the same from run to run, process to
  process and rank to rank on the same GPU model and software (the kernels use no atomics; what
  the autotuner picks from timings may differ between processes, and a different config sums in a
  different order);
- on a GPU, the default first and then every other config that fits the call: a tile no larger
  than the grid (or key patch) needs and pipeline stages within the device's shared memory (read
  from the device: sm_86/sm_89 have less than sm_80/sm_90). Configs larger than the default are
  tried too; the default is the largest that compiles without spills in the report, not a bound.

With one config left, Triton's autotuner runs it without benchmarking (its single-config rule),
so the interpreter and pinned configs never time anything. On a GPU the first call of each key
times the survivors and keeps the fastest for later calls with that key.
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional

import triton

PIN_ENV = "RLR_FAST_KERNEL_CONFIG"
DETERMINISTIC_ENV = "RLR_FAST_DETERMINISTIC"
NAMES = ("lca_fwd", "mlka_fwd", "dq", "dkdv", "mlka_dq", "mlka_dkdv", "lca_dq", "lca_dkdv", "nearest")


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


def deterministic() -> bool:
    """Whether every kernel runs its default config (no timing): ``RLR_FAST_DETERMINISTIC=1`` or
    ``torch.use_deterministic_algorithms(True)``, read at each call."""
    import torch

    return os.environ.get(DETERMINISTIC_ENV, "") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


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
    """The configs a call tries: the pinned one; else the default alone under the interpreter or
    in deterministic mode; else the default, then the others that fit."""
    candidates = KERNELS[name].candidates(args)
    if name in _PINS:
        if not 0 <= _PINS[name] < len(candidates):
            raise ValueError(f"{name} has configs 0 to {len(candidates) - 1}, {_PINS[name]} is pinned")
        return [candidates[_PINS[name]].config]
    default = [c.config for c in candidates if c.default]
    if interpreting() or deterministic():
        return default
    return default + [c.config for c in candidates if not c.default and c.reason is None]


def default_index(candidates: list) -> int:
    """Position of the default in a kernel's candidates; a default missing from the space is a bug."""
    for i, c in enumerate(candidates):
        if c.default:
            return i
    raise LookupError("the default config is not in the kernel's config space")


# Shared memory an SM gives one block (the opt-in maximum), by compute capability: sm_86 and sm_89
# have far less than sm_80 and sm_90.
SMEM_BY_ARCH = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Kept back from it for what the compiler stages besides the pipelined loads (layout conversions)
SMEM_RESERVE = 32 * 1024
_TARGET_SMEM = None  # set by `target_shared_memory` (the ahead-of-time report's target)
_TARGET_ARCH = None


def target_shared_memory(arch: Optional[int]) -> None:
    """Prune for compute capability `arch` (e.g. 90) instead of the device's, and choose the
    defaults of that target (`target_arch`): what `rlr-fast kernels` does for the target it
    compiles for. None: the device's again."""
    global _TARGET_SMEM, _TARGET_ARCH
    _TARGET_SMEM = None if arch is None else SMEM_BY_ARCH.get(arch, min(SMEM_BY_ARCH.values()))
    _TARGET_ARCH = arch


def target_arch(device=None) -> Optional[int]:
    """The compute capability (e.g. 90) the kernels are compiled for, where a default depends on it
    (wgmma on sm_90 keeps fewer registers live than mma on sm_80): the report's target if set;
    else `device`'s if it is a CUDA device and the kernels are not interpreted; else None."""
    if _TARGET_ARCH is not None:
        return _TARGET_ARCH
    if device is None or getattr(device, "type", None) != "cuda" or interpreting():
        return None
    import torch

    try:
        major, minor = torch.cuda.get_device_capability(device)
    except (AssertionError, RuntimeError):  # no CUDA here (fake CUDA tensors of a traced graph)
        return None
    return 10 * major + minor


def shared_memory_limit() -> int:
    """Shared memory one block may use: the report's target if set; else the current CUDA device's
    (read from the device); else, with no GPU, sm_80's."""
    if _TARGET_SMEM is not None:
        return _TARGET_SMEM
    import torch

    if torch.cuda.is_available() and not interpreting():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    return SMEM_BY_ARCH[80]


def shared_memory_need(rows: int, cols: int, depth: int, element_bytes: int, num_stages: int) -> int:
    """Shared memory a config's pipelined loads take, roughly: `num_stages` copies of the two
    (cols x depth) tiles it streams (k and v, or q and dO) and its own (rows x depth) tile."""
    return (num_stages * 2 * cols + rows) * depth * element_bytes


def misfit(sides: list, rows: int, cols: int, depth: int, element_bytes: int, config: triton.Config) -> Optional[str]:
    """Why `config` does not fit a call (None if it does). `sides`: (tile or block side, the
    extent it covers) pairs; `rows` x `cols` the config's scores, `depth` the operands' inner
    dimension. Larger tiles than the default's are fine: the autotuner times them."""
    if any(side > triton.next_power_of_2(max(extent, 1)) for side, extent in sides):
        return "tile larger than the grid (or key patch) needs"
    limit = shared_memory_limit()
    if shared_memory_need(rows, cols, depth, element_bytes, config.num_stages) > limit - SMEM_RESERVE:
        return f"pipeline stages need more shared memory than the device's {limit // 1024} KB per block"
    return None
