"""A generator bank's teacher tensors end to end in one buffer, so that its stacked input
is a view of the teacher, not a copy per forward."""

from typing import Sequence

import torch
from torch import Tensor


def lay_out_end_to_end(tensors: Sequence[Tensor]) -> None:
    """Move ``tensors`` (frozen, of one dtype and device) into one buffer, end to end in
    this order: each keeps its values and becomes a view of the buffer."""
    buffer = torch.cat([t.detach().reshape(-1) for t in tensors])
    for t, part in zip(tensors, buffer.split([t.numel() for t in tensors])):
        t.data = part.view(t.shape)


def joined(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors flattened and joined, (Σ numel,): a view when they lie end to end in
    one storage (:func:`lay_out_end_to_end`), else a copy."""
    first, offset = tensors[0], tensors[0].storage_offset()
    for t in tensors:
        if not (t.is_contiguous() and t.dtype == first.dtype and t.storage_offset() == offset
                and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()):
            return torch.cat([t.reshape(-1) for t in tensors])
        offset += t.numel()
    return first.detach().as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())
