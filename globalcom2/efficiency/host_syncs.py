"""Count the torch calls that would make the host wait for a CUDA device, on any device (CPU included).

A GPU runs ahead of the Python thread that feeds it as long as nothing asks for a value on the host. Every call
below does: reading a number (``item``, ``tolist``, ``bool(t)``, ``int(t)``), a result whose *size* depends on
the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``, ``bincount``), a copy to host memory, or a copy from pageable host memory, which waits for the
stream (``torch.tensor(data, device=...)``, and a Python number put at tensor indices, ``t[rows, cols] = 1``). On CUDA each one stalls
the launch queue until the device has caught up, which at small token counts is what makes a compressed prefill
no faster than the full one. ``torch.cuda.set_sync_debug_mode`` finds them on a GPU only; this counter finds
the same calls on a CPU, so CI can hold every method to a sync budget (``tests/efficiency/test_host_syncs.py``).

It is a :class:`torch.overrides.TorchFunctionMode`: it sees the torch functions and tensor methods called from
Python (all of transformers and of this package), not the ones C++ code calls internally, so it is a lower
bound of what the CUDA driver sees. Calls nested inside a counted call are not counted again (the mode is off
while its own handler runs).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Calls that read a tensor's value or data-dependent size on the host, whatever their arguments.
ALWAYS_SYNC: dict[Callable[..., Any], str] = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu",
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    torch.Tensor.argwhere: "nonzero",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique",
    torch.Tensor.unique_consecutive: "unique",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.equal: "equal",
    torch.Tensor.equal: "equal",
    torch.allclose: "allclose",
    torch.Tensor.allclose: "allclose",
}


def _is_bool_index(index: Any) -> bool:
    """A boolean tensor anywhere in an indexing expression (``x[mask]``, ``x[:, mask]``)."""
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool and index.dim() > 0
    if isinstance(index, (tuple, list)):
        return any(_is_bool_index(part) for part in index)
    return False


def _number_put_by_tensor_index(index: Any, value: Any) -> bool:
    """``t[rows, cols] = 1``: a Python number put at tensor indices. PyTorch wraps the number in a host
    tensor and ``index_put_`` copies it to ``t``'s device with a blocking copy (pytorch/pytorch
    ``aten/src/ATen/native/TensorAdvancedIndexing.cpp``, ``_index_put_impl_``: ``value.to(self.device())``),
    which on CUDA waits for the stream. A slice or a boolean mask filled with a number (``fill_``,
    ``masked_fill_``) does not; put a device tensor (``torch.ones_like``) or build the result without a
    scatter instead."""
    parts = index if isinstance(index, (tuple, list)) else (index,)
    has_tensor = any(isinstance(part, torch.Tensor) and part.dim() > 0 for part in parts)
    return has_tensor and isinstance(value, (bool, int, float, complex))


def _to_host(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to("cpu")``: a copy to host memory by name. (A ``torch.device`` target is the model's device
    in practice, ``x.to(other.device)``, which on a CPU run cannot be told apart from a copy to the host.)"""
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, str) and t.startswith("cpu") for t in targets)


def _host_data_to_device(args: tuple, kwargs: dict) -> bool:
    """``torch.tensor(python_data, device=...)``: a copy from pageable host memory, which on CUDA waits for
    the stream (``non_blocking=False``); counted whatever the device, as the call would sync on a GPU."""
    device = kwargs.get("device")
    if device is None or (isinstance(device, str) and device.startswith("cpu")):
        return False
    data = args[0] if args else kwargs.get("data")
    return not (isinstance(data, (list, tuple)) and len(data) == 0)  # an empty copy moves nothing


def sync_kind(func: Callable[..., Any], args: tuple, kwargs: dict) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is counted, or ``None`` when it needs no host read."""
    kind = ALWAYS_SYNC.get(func)
    if kind is not None:
        return kind
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
        if _is_bool_index(args[1]):
            return "bool_mask_index"
        if (
            func is torch.Tensor.__setitem__
            and len(args) > 2
            and _number_put_by_tensor_index(args[1], args[2])
        ):
            return "host_to_device"
        return None
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave"
        return None
    if func in (torch.bincount, torch.Tensor.bincount):
        return "bincount"  # the output size is max(input) + 1, read on the host even with minlength
    if func in (torch.where, torch.Tensor.where) and len(args) + len(kwargs) == 1:
        return "nonzero"  # torch.where(condition) is nonzero(as_tuple=True)
    if func is torch.Tensor.to and _to_host(args, kwargs):
        return "cpu"
    if func in (torch.tensor, torch.as_tensor) and _host_data_to_device(args, kwargs):
        return "host_to_device"
    return None


_TORCH_DIR = str(Path(torch.__file__).parent)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch: the line that asked for the host read."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    parts = Path(frame.f_code.co_filename).parts
    return f"{'/'.join(parts[-3:])}:{frame.f_lineno}"


class HostSyncCounter(TorchFunctionMode):
    """Counts, by kind and by calling line, the calls inside the ``with`` block that would wait for a CUDA
    device.

    Usage::

        with HostSyncCounter() as syncs:
            model(**inputs)
        syncs.total, syncs.by_kind, syncs.by_line
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self.by_line: Counter[str] = Counter()  # "kind at path:line"

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.by_kind[kind] += 1
            self.by_line[f"{kind} at {_caller()}"] += 1
        return func(*args, **kwargs)


@contextmanager
def counting_host_syncs() -> Iterator[HostSyncCounter]:
    """``with counting_host_syncs() as syncs: ...`` (the counter, entered)."""
    with HostSyncCounter() as counter:
        yield counter
