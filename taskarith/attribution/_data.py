"""The data side of :func:`taskarith.attribution.integrated_gradients`: batches of ``data`` in the forms
it accepts, moved to the model's device and dtype, and checks of what the objective returns."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from ..errors import TaskArithError


def batches(data, batch_size: int | None) -> Iterator:
    """Batches of ``data``, lazily: a tensor pair is sliced, anything else is iterated once."""
    if isinstance(data, torch.Tensor):
        raise TaskArithError("data is a single tensor; pass (inputs, targets), a DataLoader or an iterable of batches")
    if _is_pair(data):
        inputs, targets = data
        parts = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        sizes = {t.shape[0] if t.dim() else None for t in (*parts, targets)}
        if len(sizes) != 1 or None in sizes:
            shapes = ", ".join(str(tuple(t.shape)) for t in (*parts, targets))
            raise TaskArithError(f"inputs and targets must share their first (example) dimension, got {shapes}")
        n = sizes.pop()
        if n == 0:
            raise TaskArithError("data holds no examples; pass (inputs, targets) with at least one example")
        size = batch_size or n

        def cut(i: int):
            x = inputs[i:i + size] if isinstance(inputs, torch.Tensor) else tuple(t[i:i + size] for t in parts)
            return x, targets[i:i + size]

        return (cut(i) for i in range(0, n, size))
    if batch_size is not None:
        raise TaskArithError("batch_size splits a tensor pair; a DataLoader or iterable keeps its own batches")
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise TaskArithError(f"data must be (inputs, targets), a DataLoader or an iterable of batches, "
                             f"got {type(data).__name__}")
    return iter(data)


def _is_pair(data) -> bool:
    """``(inputs, targets)`` of whole tensors, inputs a tensor or a tuple of tensors."""
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not isinstance(data[1], torch.Tensor):
        return False
    inputs = data[0]
    return isinstance(inputs, torch.Tensor) or (
        isinstance(inputs, (tuple, list)) and len(inputs) > 0 and all(isinstance(t, torch.Tensor) for t in inputs))


def prepare(batch, index: int, device: torch.device, compute: torch.dtype):
    """``(inputs as a tuple, targets)`` on ``device``, floating inputs in ``compute``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TaskArithError(f"batch #{index} is a {type(batch).__name__}; each batch must be (inputs, targets)")
    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TaskArithError(f"batch #{index}: inputs must be a tensor or a tuple of tensors")
    if any(t.dim() > 0 and t.shape[0] == 0 for t in inputs):
        raise TaskArithError(f"batch #{index} holds no examples")
    inputs = tuple(t.to(device, compute) if t.is_floating_point() else t.to(device) for t in inputs)
    if isinstance(targets, torch.Tensor):
        targets = targets.to(device)
    return inputs, targets


def check_objective(result: object, index: int = 0) -> None:
    """Refuse, saying what to do, an objective's result that is not a floating-point scalar tensor."""
    where = f" on batch #{index}" if index else ""
    if not isinstance(result, torch.Tensor):
        raise TaskArithError(
            f"the objective returned a {type(result).__name__}{where}; it must return a 0-d tensor computed "
            "from the model's output (no .item())")
    if result.numel() != 1:
        raise TaskArithError(
            f"the objective returned a tensor of shape {tuple(result.shape)}{where}; it must be a scalar "
            "(reduce it with .mean() or .sum())")
    if not result.is_floating_point():
        raise TaskArithError(f"the objective returned a {result.dtype} tensor{where}; it must be floating-point")
