"""Diagnostics for task vectors: similarity, sign conflicts, sparsity and weight disentanglement.

Every reduction runs over the vectors' packed buffers in blocks, accumulating
in float64 (or exact integer counts), so vectors of hundreds of millions of
entries cost a few passes over memory and no full-size temporaries. Tied
weights are counted once, as in :meth:`TaskVector.dot`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .errors import TaskArithError, raise_if_any
from .io import Source, load_state_dict
from .merging._trim import trim_plans
from .vector import TaskVector, _dot64

__all__ = ["cosine_matrix", "sign_conflict_rate", "sparsity", "weight_disentanglement"]

_BLOCK_BYTES = 32 << 20  # float64 working set of one block over all vectors (accelerators)
_COUNT_BYTES = 4 << 20  # working set of one block of sign counting: in cache (faster than 32 MB blocks)
_CACHE_BLOCK = 1 << 18  # entries per block of the CPU Gram matrix


def cosine_matrix(vectors: Sequence[TaskVector]) -> torch.Tensor:
    """Pairwise cosine similarities ``C[i, j] = <τ_i, τ_j> / (‖τ_i‖ ‖τ_j‖)`` as a float64 ``[n, n]`` tensor.

    The Gram matrix is accumulated in float64 block by block, so every vector is
    read from memory once however many there are. The
    result is symmetric, clamped to ``[-1, 1]``, with 1 on the diagonal for
    non-zero vectors. A zero vector has cosine 0 with every vector, itself
    included (its row, column and diagonal entry are 0), matching
    :meth:`TaskVector.cosine`.

    Args:
        vectors: task vectors with the same names and shapes.

    Example:
        >>> import torch, taskarith as ta
        >>> from taskarith.metrics import cosine_matrix
        >>> a = ta.TaskVector({"w": torch.tensor([1.0, 0.0])})
        >>> b = ta.TaskVector({"w": torch.tensor([1.0, 1.0])})
        >>> cosine_matrix([a, b, 0 * a])
        tensor([[1.0000, 0.7071, 0.0000],
                [0.7071, 1.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]], dtype=torch.float64)
    """
    vectors = _validate(vectors, "cosine_matrix")
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    if vectors[0].device.type == "cpu":
        # Blocks small enough to stay in cache: every vector is read from memory once, and the
        # n(n+1)/2 float64 dot products of a block run from cache (numpy casts inside its loop).
        sums = [[[] for _ in range(n)] for _ in range(n)]
        for parts in _blocks(vectors, _CACHE_BLOCK):
            for i in range(n):
                for j in range(i, n):
                    sums[i][j].append(_dot64(parts[i], parts[j]))
        for i in range(n):
            for j in range(i, n):
                gram[i, j] = gram[j, i] = math.fsum(sums[i][j])
    else:  # accelerators: one float64 matrix product per block
        block = max(1 << 12, _BLOCK_BYTES // (8 * n))
        for parts in _blocks(vectors, block):
            stacked = torch.stack([p.to(torch.float64) for p in parts])
            gram += (stacked @ stacked.T).cpu()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denominator = torch.outer(norms, norms)
    cosine = torch.where(denominator > 0, gram / torch.where(denominator > 0, denominator, 1), 0.0)
    cosine = cosine.clamp(-1.0, 1.0)
    nonzero = norms > 0
    cosine.diagonal().copy_(nonzero.to(torch.float64))
    return (cosine + cosine.T) / 2  # exactly symmetric


def sign_conflict_rate(
    vectors: Sequence[TaskVector], *, density: float | None = None, scope: str = "global"
) -> float:
    """Fraction of shared entries on which the vectors disagree in sign.

    Let ``v̂_i`` be vector ``i`` itself, or with ``density`` its trim to the
    ``floor(density · n)`` largest-magnitude entries (``n`` is the vector's size
    with ``scope="global"``, each tensor's with ``"tensor"``; exactly the trim of
    TIES, :func:`taskarith.merging.trim`, ties at the threshold kept in storage
    order). For each entry ``j`` let ``P_j`` and ``N_j`` count the vectors with
    ``v̂_i[j] > 0`` and ``v̂_i[j] < 0``. Then::

        rate = #{j : P_j >= 1 and N_j >= 1} / #{j : P_j + N_j >= 2}

    the share of entries where at least two vectors are non-zero in which two
    of them have opposite signs. It is 0.0 when no entry is non-zero in two
    vectors (a single vector, disjoint supports). NaN entries count as zero.

    Args:
        vectors: task vectors with the same names and shapes.
        density: keep only each vector's top-``density`` magnitudes, in (0, 1].
        scope: ``"global"`` or ``"tensor"``, as in TIES.

    Example:
        >>> import torch, taskarith as ta
        >>> from taskarith.metrics import sign_conflict_rate
        >>> a = ta.TaskVector({"w": torch.tensor([1.0, -2.0, 0.0, 3.0])})
        >>> b = ta.TaskVector({"w": torch.tensor([2.0, 1.0, 5.0, -0.1])})
        >>> sign_conflict_rate([a, b])  # entries 0, 1, 3 are shared; 1 and 3 conflict
        0.6666666666666666
        >>> sign_conflict_rate([a, b], density=0.5)  # a keeps -2, 3; b keeps 2, 5: nothing shared
        0.0
    """
    vectors = _validate(vectors, "sign_conflict_rate")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                or not 0 < density <= 1):
        raise TaskArithError(f"density must be a number in (0, 1] or None, got {density!r}")
    if scope not in ("global", "tensor"):
        raise TaskArithError(f"scope must be 'global' or 'tensor', got {scope!r}")
    n = len(vectors)
    count_dtype = torch.int16 if n < 2**15 else torch.int32
    block = max(1 << 12, _COUNT_BYTES // (2 * n + 8))
    if density is not None and density < 1:
        # The one trim plan of the merges (TIES' trim), applied a tensor at a time.
        plans = trim_plans(vectors, density, scope)
        blocks = ((name, offset, parts) for name in vectors[0]._layout.slots
                  for _, offset, parts in _named_blocks([TaskVector._wrap(name, p.trimmed(name).contiguous())
                                                         for p in plans], block, by_name=False))
    else:
        blocks = _named_blocks(vectors, block, by_name=False)
    shared = conflicting = 0
    for _, _, parts in blocks:
        positive = torch.zeros(parts[0].shape, dtype=count_dtype, device=parts[0].device)
        negative = torch.zeros_like(positive)
        for x in parts:
            positive += x > 0
            negative += x < 0
        shared += int(torch.count_nonzero((positive + negative) >= 2))
        conflicting += int(torch.count_nonzero((positive > 0) & (negative > 0)))
    return conflicting / shared if shared else 0.0


def sparsity(vector: TaskVector | torch.Tensor, *, atol: float = 0.0) -> float:
    """Fraction of entries with ``|x| <= atol`` (exact zeros by default); NaN counts as non-zero.

    As when torch compares a tensor with a Python number, ``atol`` is taken in
    each tensor's dtype: a float32 entry written as ``1e-3`` (1.00000005e-3)
    counts as small for ``atol=1e-3``.

    Tied weights are counted once. An empty vector has sparsity 0.0.

    Example:
        >>> import torch, taskarith as ta
        >>> from taskarith.metrics import sparsity
        >>> tv = ta.TaskVector({"w": torch.tensor([0.0, 1e-4, -2.0, 0.0])})
        >>> sparsity(tv), sparsity(tv, atol=1e-3)
        (0.5, 0.75)
    """
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise TaskArithError(f"atol must be a number >= 0, got {atol!r}")
    if isinstance(vector, torch.Tensor):
        buffers = [vector.detach().reshape(-1)]
    elif isinstance(vector, TaskVector):
        buffers = list(vector._buffers.values())
    else:
        raise TaskArithError(f"sparsity takes a TaskVector or a tensor, got {type(vector).__name__}")
    total = sum(b.numel() for b in buffers)
    if total == 0:
        return 0.0
    nonzero = 0
    for buf in buffers:
        if atol == 0:
            nonzero += int(torch.count_nonzero(buf))  # NaN is non-zero
            continue
        step = max(1, _BLOCK_BYTES // 8)
        for start in range(0, buf.numel(), step):
            chunk = buf[start:start + step]
            nonzero += int(torch.count_nonzero(~(chunk.abs() <= atol)))
    return (total - nonzero) / total


def weight_disentanglement(
    base: Source,
    vectors: Sequence[TaskVector],
    evaluate: Callable[[dict[str, torch.Tensor], int], Any],
    *,
    scales: Sequence[float],
    distance: Callable[[Any, Any], float] | None = None,
    diagonal: bool = False,
    per_task: bool = False,
) -> torch.Tensor:
    """The weight-disentanglement error of Ortiz-Jimenez et al. (2023) over a grid of scales.

    For task vectors ``τ_1..τ_T`` on the pretrained weights ``θ0``::

        ξ(α_1, ..., α_T) = Σ_t  dist( f_t(θ0 + α_t τ_t),  f_t(θ0 + Σ_j α_j τ_j) )

    where ``f_t(θ) = evaluate(state_dict_θ, t)`` is the model's output on task
    ``t``'s data ``D_t`` and ``dist`` averages a per-example distance over
    ``D_t`` (the paper's ``E_{x∈D_t}``; by default the prediction disagreement
    ``1[argmax y1 ≠ argmax y2]``). ``ξ = 0`` means adding the other tasks'
    vectors leaves each task's predictions unchanged: the vectors are weight
    disentangled (https://arxiv.org/abs/2305.12827, Eq. 5).

    ``evaluate`` runs ``T·len(scales)`` times on single-task models (cached)
    and ``T`` times per grid point on the combined model.

    Args:
        base: the pretrained model (module, state_dict, file or directory).
        vectors: the task vectors ``τ_t``, same names and shapes.
        evaluate: ``evaluate(state_dict, t)`` returns the outputs on task ``t``'s
            data (logits, labels, or anything ``distance`` accepts). The state
            dict is fresh for each call: load it into your model.
        scales: the values each ``α`` takes (e.g. ``torch.linspace(-3, 3, 13)``).
        distance: ``distance(outputs_single, outputs_combined) -> float``, the mean
            distance over the task's examples. Default: the fraction of
            disagreeing predictions (argmax over the last dimension for floating
            outputs, direct comparison for integer or bool labels).
        diagonal: evaluate ``ξ(α, ..., α)`` for every ``α`` in ``scales`` (one
            axis) instead of the full two-task grid; required for ``T != 2``.
        per_task: return each task's term separately (a leading axis of size ``T``)
            instead of their sum.

    Returns:
        float64 tensor: ``E[i, j] = ξ(scales[i], scales[j])`` of shape ``[S, S]``
        for two tasks, or ``E[i] = ξ(scales[i], ..., scales[i])`` of shape ``[S]``
        with ``diagonal=True``; with ``per_task`` a leading ``[T]`` axis.

    Example:
        >>> import torch, taskarith as ta
        >>> from taskarith.metrics import weight_disentanglement
        >>> base = {"w": torch.zeros(2)}
        >>> t1 = ta.TaskVector({"w": torch.tensor([1.0, 0.0])})  # task 0 reads w[0] only
        >>> t2 = ta.TaskVector({"w": torch.tensor([0.0, 1.0])})  # task 1 reads w[1] only
        >>> evaluate = lambda state, t: state["w"][t:t + 1]
        >>> mse = lambda a, b: float(((a - b) ** 2).mean())
        >>> weight_disentanglement(base, [t1, t2], evaluate, scales=[0.0, 1.0], distance=mse)
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64)
    """
    vectors = _validate(vectors, "weight_disentanglement")
    if not callable(evaluate):
        raise TaskArithError(f"evaluate must be a callable evaluate(state_dict, task_index), got {type(evaluate).__name__}")
    alphas = _scales(scales)
    count = len(vectors)
    if not diagonal and count != 2:
        raise TaskArithError(
            f"the full grid over {count} tasks has {len(alphas)}**{count} points; "
            "pass diagonal=True to evaluate ξ(α, ..., α), or pass exactly two vectors"
        )
    distance = _disagreement if distance is None else distance
    state = load_state_dict(base)
    single: dict[tuple[int, int], Any] = {}

    def single_output(t: int, i: int):
        if (t, i) not in single:
            single[(t, i)] = evaluate(vectors[t].apply_to(state, alphas[i]), t)
        return single[(t, i)]

    def terms(index: tuple[int, ...]) -> list[float]:
        combined = TaskVector.sum(vectors, [alphas[i] for i in index]).apply_to(state)
        out = []
        for t in range(count):
            value = distance(single_output(t, index[t]), evaluate(combined, t))
            out.append(float(value))
        return out

    size = len(alphas)
    grid = [(i, j) for i in range(size) for j in range(size)] if not diagonal else [(i,) * count for i in range(size)]
    values = torch.tensor([terms(index) for index in grid], dtype=torch.float64)  # [points, T]
    shape = (size,) if diagonal else (size, size)
    result = values.T.reshape(count, *shape)
    return result if per_task else result.sum(0)


# ------------------------------------------------------------------ helpers


def _validate(vectors, op: str) -> list[TaskVector]:
    vectors = list(vectors) if not isinstance(vectors, TaskVector) else [vectors]
    if not vectors:
        raise TaskArithError(f"{op} needs at least one task vector")
    bad = [f"#{i} ({type(v).__name__})" for i, v in enumerate(vectors) if not isinstance(v, TaskVector)]
    raise_if_any(bad, error=TaskArithError, header=f"{op} takes TaskVector inputs",
                 fix="Build them with TaskVector.from_models(...), TaskVector(mapping) or TaskVector.load(path).")
    for v in vectors[1:]:
        vectors[0]._check_compatible(v, op)
    return vectors


def _scales(scales) -> list[float]:
    if isinstance(scales, torch.Tensor):
        scales = scales.reshape(-1).tolist()
    try:
        values = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise TaskArithError(f"scales must be a sequence of numbers, got {scales!r:.80}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise TaskArithError(f"scales must be a non-empty sequence of finite numbers, got {values}")
    return values


def _blocks(vectors: list[TaskVector], block: int) -> Iterator[list[torch.Tensor]]:
    """Aligned flat blocks of every vector, covering each distinct entry once."""
    for _, _, parts in _named_blocks(vectors, block, by_name=False):
        yield parts


def _named_blocks(vectors: list[TaskVector], block: int, *, by_name: bool) -> Iterator[tuple[str | None, int, list]]:
    """``(name, offset, parts)``: aligned blocks; whole buffers when layouts agree and names are not needed."""
    first = vectors[0]
    if not by_name and all(v._layout == first._layout for v in vectors):
        for dt, buf in first._buffers.items():
            bufs = [v._buffers[dt] for v in vectors]
            for start in range(0, buf.numel(), block):
                yield None, start, [b[start:start + block] for b in bufs]
        return
    for name in first._layout.slots:
        flats = [v[name].reshape(-1) for v in vectors]
        for start in range(0, flats[0].numel(), block):
            yield name, start, [f[start:start + block] for f in flats]


def _disagreement(a, b) -> float:
    """Fraction of examples whose predictions differ (argmax of the last dim for float outputs)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise TaskArithError(
            f"evaluate returned outputs of shape {tuple(a.shape)} and {tuple(b.shape)} for one task; "
            "it must return the same examples for every model"
        )
    if a.is_floating_point() or a.is_complex():
        if a.dim() == 0:
            raise TaskArithError("floating 0-d outputs have no class axis; return logits [..., classes] "
                                 "or pass distance=...")
        a, b = a.argmax(-1), b.argmax(-1)
    if a.numel() == 0:
        return 0.0
    return float((a != b).double().mean())
