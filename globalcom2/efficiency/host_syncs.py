"""Count the torch calls that would make the host wait for a CUDA device, on any device (CPU included).

A GPU runs ahead of the Python thread that feeds it as long as nothing asks for a value on the host. Every call
below does: reading a number (``item``, ``tolist``, ``bool(t)``, ``int(t)``), a result whose *size* depends on
the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``, ``bincount``), a copy to host memory, or a copy from pageable host memory, which waits for
the stream (``torch.tensor(data, device=...)``; indexing with host data or putting a number at tensor indices,
:func:`indexing_sync`). On CUDA each one stalls the launch queue until the device has caught up, which at small
token counts is what makes a compressed prefill no faster than the full one. ``torch.cuda.set_sync_debug_mode``
finds them on a GPU only; this counter finds the same calls on a CPU, so CI can hold every method to a sync
budget (``tests/efficiency/test_host_syncs.py``).

It is a :class:`torch.overrides.TorchFunctionMode`: it sees the torch functions and tensor methods called from
Python (all of transformers and of this package), not the ones C++ code calls internally, so it is a lower
bound of what the CUDA driver sees. Calls nested inside a counted call are not counted again (the mode is off
while its own handler runs). It does not see ``torch.cuda.synchronize`` and ``Event``/``Stream.synchronize``
(not torch functions; the hot paths call none, and the GPU tests' ``set_sync_debug_mode`` would see them), nor
``x.to(other.device)`` from pageable memory (on a CPU run the target is the host itself); both are blind spots
of a CPU count.
"""

from __future__ import annotations

import numbers
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
    torch.Tensor.__contains__: "contains",  # ``x in t``: an any() read back on the host
    torch.Tensor.__format__: "format",  # an f-string of a tensor reads its values
    torch.Tensor.__repr__: "format",  # so do repr(t), str(t) and a %-format
    torch.Tensor.__str__: "format",
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


#: Factories: every argument is a number (a size, a count, a fill value).
FACTORIES = frozenset(
    {
        torch.arange,
        torch.zeros,
        torch.ones,
        torch.empty,
        torch.full,
        torch.eye,
        torch.randperm,
        torch.linspace,
    }
)
#: Calls that take sizes, counts, offsets or fill values as numbers: a 0-dim tensor in their place is read on
#: the host by the C++ argument parser (``torch.arange(n)`` with ``n`` a tensor, ``x.topk(k)``,
#: ``x.narrow(0, start, length)``), where no Python ``__index__`` call shows it.
#: Their first argument is the tensor they act on, but for :data:`FACTORIES`.
NUMBER_ARGUMENTS = FACTORIES | frozenset(
    {
        *(torch.narrow, torch.Tensor.narrow, torch.topk, torch.Tensor.topk),
        *(torch.kthvalue, torch.Tensor.kthvalue, torch.reshape, torch.Tensor.reshape, torch.Tensor.view),
        *(torch.Tensor.expand, torch.Tensor.repeat, torch.split, torch.Tensor.split, torch.roll),
        *(torch.Tensor.roll, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty),
        torch.Tensor.new_full,
    }
)

_NO_VALUE = object()


def _is_integer_scalar_tensor(part: Any) -> bool:
    return (
        isinstance(part, torch.Tensor)
        and part.dim() == 0
        and not (part.is_floating_point() or part.is_complex())
    )


def indexing_sync(tensor: torch.Tensor, index: Any, value: Any = _NO_VALUE) -> str | None:
    """The kind under which ``tensor[index]`` (or ``tensor[index] = value``) is counted, or ``None``.

    How PyTorch runs Python indexing on a CUDA tensor (``torch/csrc/autograd/python_variable_indexing.cpp``
    and ``aten/src/ATen/native/TensorAdvancedIndexing.cpp`` in the 2.x sources; a torch 2.11 H100 run saw
    CUDA's sync detector flag the number put at tensor indices):

    * a 0-dim integer tensor in the index is read on the host (``item``), getting or putting;
    * a boolean mask is expanded by ``nonzero`` (a data-dependent size), except ``t[mask] = number`` (also
      with slices beside the mask), which becomes ``masked_fill_`` and reads nothing;
    * a list in the index is host data, copied to the device with a blocking copy;
    * a number put at tensor indices (``t[rows, cols] = 1``) is wrapped in a host tensor that
      ``_index_put_impl_`` copies to the device with a blocking copy (``value.to(self.device())``), and a
      number put into one element (``t[0, 3] = 1``) is a blocking 0-dim ``copy_``. A slice or a row filled
      with a number (``fill_``) is not: put a device tensor (``torch.ones_like``) or build the result
      without a scatter instead. (Newer PyTorch may drop the first of these waits: pytorch/pytorch#188330.)
    """
    parts = index if isinstance(index, tuple) else (index,)  # a list is one advanced index, as in NumPy
    if any(_is_integer_scalar_tensor(part) for part in parts):
        return "index"
    masks = [p for p in parts if isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0]
    putting_number = value is not _NO_VALUE and isinstance(value, numbers.Number)
    if masks:
        others_are_slices = all(isinstance(p, slice) or p is Ellipsis for p in parts if p is not masks[0])
        return None if putting_number and len(masks) == 1 and others_are_slices else "bool_mask_index"
    if any(isinstance(part, list) for part in parts):
        return "host_to_device"
    if putting_number:
        if any(isinstance(part, torch.Tensor) and part.dim() > 0 for part in parts):
            return "host_to_device"
        one_element = len(parts) == tensor.dim() and all(
            isinstance(part, int) and not isinstance(part, bool) for part in parts
        )
        return "host_to_device" if one_element else None
    return None


def _to_host(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to("cpu")``: a copy to host memory by name. (A ``torch.device`` target is the model's device
    in practice, ``x.to(other.device)``, which on a CPU run cannot be told apart from a copy to the host.)"""
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, str) and t.startswith("cpu") for t in targets)


def _host_data_to_device(args: tuple, kwargs: dict) -> bool:
    """``torch.tensor(python_data, device=...)``: a copy from pageable host memory, which on CUDA waits for
    the stream (``non_blocking=False``); counted whatever the device, as the call would sync on a GPU.
    Conservative on a CPU run, where host and device are one: ``torch.as_tensor(t, device=t.device)``, which
    copies nothing on a GPU either, and ``device=torch.device("cpu")`` are counted too (neither is in the
    package's hot paths); only a target named ``"cpu"`` is taken as a stay on the host."""
    device = kwargs.get("device")
    if device is None or (isinstance(device, str) and device.startswith("cpu")):
        return False
    data = args[0] if args else kwargs.get("data")
    return not (isinstance(data, (list, tuple)) and len(data) == 0)  # an empty copy moves nothing


def _scalar_tensor_argument(func: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Whether a call of :data:`NUMBER_ARGUMENTS` passes a 0-dim tensor as a number (a size may also come as
    a tuple of them); the tensor it acts on (``self``, or ``input`` of ``torch.narrow``/``topk``/...) is not
    such an argument."""
    numbers_given = [*(args if func in FACTORIES else args[1:]), *kwargs.values()]
    flat = [x for value in numbers_given for x in (value if isinstance(value, tuple | list) else (value,))]
    return any(isinstance(value, torch.Tensor) and value.dim() == 0 for value in flat)


def sync_kind(func: Callable[..., Any], args: tuple, kwargs: dict) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is counted, or ``None`` when it needs no host read."""
    kind = ALWAYS_SYNC.get(func)
    if kind is not None:
        return kind
    if func is torch.Tensor.__getitem__ and len(args) > 1:
        return indexing_sync(args[0], args[1])
    if func is torch.Tensor.__setitem__ and len(args) > 2:
        return indexing_sync(args[0], args[1], args[2])
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        # a tensor of repeats, even of one element (broadcast), sizes the output from its values
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave"
        return None
    if func in NUMBER_ARGUMENTS and _scalar_tensor_argument(func, args, kwargs):
        return "scalar_argument"
    if func is torch.nn.functional.one_hot:
        classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        return "one_hot" if classes == -1 else None  # without num_classes the width is max(input) + 1
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
