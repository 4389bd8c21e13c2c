"""A generator bank's teacher tensors end to end in one buffer, so that its stacked input
is a view of the teacher, not a copy per forward."""

from typing import Sequence

import torch
from torch import Tensor


def lay_out_end_to_end(tensors: Sequence[Tensor]) -> None:
    """Move ``tensors`` (frozen, of one dtype and device) into one buffer, end to end in
    this order, unless they already lie so: each keeps its values and becomes a view of
    the buffer."""
    if _end_to_end(tensors):
        return
    buffer = torch.cat([t.detach().reshape(-1) for t in tensors])
    for t, part in zip(tensors, buffer.split([t.numel() for t in tensors])):
        t.data = part.view(t.shape)


def _end_to_end(tensors: Sequence[Tensor]) -> bool:
    """Whether ``tensors`` lie end to end, in this order, in one storage."""
    first, offset = tensors[0], tensors[0].storage_offset()
    for t in tensors:
        if not (t.is_contiguous() and t.dtype == first.dtype and t.storage_offset() == offset
                and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()):
            return False
        offset += t.numel()
    return True


def joined(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors flattened and joined, (Σ numel,): a view when they lie end to end in
    one storage (:func:`lay_out_end_to_end`), else a copy."""
    if not _end_to_end(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])
    first = tensors[0]
    size = sum(t.numel() for t in tensors)
    return first.detach().as_strided((size,), (1,), first.storage_offset())
