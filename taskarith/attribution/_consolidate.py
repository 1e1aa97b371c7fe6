"""One task vector from several, chosen entry by entry from scores; and tuning its scale.

:func:`consolidate` keeps, for each task vector, the entries with the highest
scores (integrated-gradient attributions from
:func:`taskarith.attribution.integrated_gradients`, or magnitudes when no
scores are given), settles entries where the kept values of several vectors
disagree in sign, and merges what agrees. With magnitude scores and
``select="abs", resolve="sign_sum", merge="disjoint_mean"`` it is TIES-merging
(Yadav et al., 2023, https://arxiv.org/abs/2306.01708) without the final scale.

:func:`tune_scale` picks the scale λ of ``θ0 + λ·τ`` on a validation callable.

Nothing here imports captum.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from .. import merging
from ..errors import ShapeMismatchError, TaskArithError, check_same_keys, raise_if_any
from ..io import Source, load_state_dict
from ..merging.consolidation import MERGES, RESOLVES, SCOPES, SELECTS
from ..vector import TaskVector

__all__ = ["DEFAULT_GRID", "consolidate", "tune_scale"]

#: λ values tried by :func:`tune_scale` unless a grid is given.
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise TaskArithError(f"{name}={value!r} is not one of {valid}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def consolidate(
    vectors: Sequence[TaskVector],
    scores: Sequence[Mapping[str, torch.Tensor]] | None = None,
    *,
    density: float = 0.2,
    scope: str = "global",
    select: str = "positive",
    resolve: str = "attribution",
    merge: str = "disjoint_mean",
) -> TaskVector:
    """One task vector built from the highest-scoring entries of several.

    For each vector ``τ_t`` with scores ``s_t`` (same names and shapes):

    1. **Select.** Keep the ``k = floor(density * n)`` entries with the largest
       eligible score, where ``n`` counts the vector's entries (``scope="global"``,
       tied weights once) or each tensor's entries (``scope="tensor"``, one ``k``
       per tensor). Ties at the threshold go to the lowest index, so exactly
       ``k`` entries are kept. ``select="abs"`` ranks by ``|s|``;
       ``select="positive"`` ranks by ``s`` and never keeps an entry whose score
       is ``<= 0`` (fewer than ``k`` are kept when fewer than ``k`` are positive).
       With ``scores=None`` the scores are the magnitudes ``|τ_t|``.
    2. **Resolve** entries where kept values of several vectors differ in sign.
       ``"attribution"``: the sign whose kept values have the larger total
       eligible score; ``"sign_sum"``: the sign of the sum of the kept values
       (TIES' election); both give ties to ``+``. ``"max"``: only the single
       vector with the largest eligible score there (ties to the earliest
       vector), whatever the signs.
    3. **Merge** the kept values of the winning sign: ``"disjoint_mean"``
       averages them, ``"sum"`` adds them (with ``resolve="max"`` there is one
       value, so both give it). Entries no vector keeps are 0.

    With magnitude scores, ``"attribution"`` and ``"sign_sum"`` elect the same
    sign (up to rounding in exact near-ties), and ``scores=None, select="abs", resolve="sign_sum",
    merge="disjoint_mean"`` is exactly TIES (trim, elect, disjoint mean); scale
    the result with :func:`tune_scale`.

    Args:
        vectors: task vectors with the same names and shapes.
        scores: ``None`` (magnitudes), or one mapping per vector with its names
            and shapes, e.g. the :class:`~taskarith.attribution.Attribution`
            of each task. Scores must be finite real numbers.
        density: fraction of entries kept per vector, in (0, 1].
        scope: ``"global"`` or ``"tensor"``.
        select: ``"positive"`` or ``"abs"``.
        resolve: ``"attribution"``, ``"sign_sum"`` or ``"max"``.
        merge: ``"disjoint_mean"`` or ``"sum"``.

    Returns:
        A :class:`~taskarith.TaskVector` with the first vector's names, in the
        promoted dtype of the inputs; tied names stay tied.

    Example:
        >>> import torch, taskarith as ta
        >>> a = ta.TaskVector({"w": torch.tensor([3.0, -1.0, 2.0, 0.5])})
        >>> b = ta.TaskVector({"w": torch.tensor([1.0, 4.0, -2.0, 0.0])})
        >>> ta.consolidate([a, b], density=0.5, select="abs", resolve="sign_sum")["w"]
        tensor([3., 4., 2., 0.])
        >>> ig_a = {"w": torch.tensor([0.1, 0.0, -0.3, 0.2])}
        >>> ig_b = {"w": torch.tensor([0.0, 0.5, 0.4, -0.1])}
        >>> ta.consolidate([a, b], [ig_a, ig_b], density=0.5)["w"]  # a's 2.0 hurt its task
        tensor([ 3.0000,  4.0000, -2.0000,  0.5000])
    """
    if not _is_real(density) or not 0 < density <= 1:
        raise TaskArithError(f"density must be a number in (0, 1], got {density!r}")
    _check_choice("scope", scope, SCOPES)
    _check_choice("select", select, SELECTS)
    _check_choice("resolve", resolve, RESOLVES)
    _check_choice("merge", merge, MERGES)
    vectors = _check_vectors(vectors)
    first = vectors[0]
    names = list(first._layout.slots)  # canonical names: tied weights once
    eligible = _check_scores(vectors, scores, names)

    return merging.merge(vectors, "consolidate", scores=eligible, density=density, scope=scope, select=select,
                         resolve=resolve, merge=merge)


def _check_vectors(vectors: object) -> list[TaskVector]:
    if isinstance(vectors, (TaskVector, Mapping)) or not isinstance(vectors, Sequence):
        raise TaskArithError(f"consolidate takes a list of TaskVector, got {type(vectors).__name__}")
    vectors = list(vectors)
    if not vectors:
        raise TaskArithError("consolidate needs at least one task vector")
    bad = [f"#{i} ({type(v).__name__})" for i, v in enumerate(vectors) if not isinstance(v, TaskVector)]
    raise_if_any(bad, error=TaskArithError, header="consolidate takes task vectors only",
                 fix="Build each with TaskVector.from_models(pretrained, finetuned).")
    for v in vectors[1:]:
        vectors[0]._check_compatible(v, "consolidate")
    return vectors


def _check_scores(vectors: list[TaskVector], scores: object, names: list[str]) -> list[dict[str, torch.Tensor]] | None:
    """Per vector, name -> its validated score (float32, float64 kept); None without scores: the method
    then ranks the deltas' magnitudes."""
    first = vectors[0]
    if scores is None:  # the method takes the deltas' magnitudes
        return None
    if isinstance(scores, Mapping) or not isinstance(scores, Sequence):
        raise TaskArithError(
            f"scores must be a list with one mapping per vector (or None for magnitudes), got {type(scores).__name__}"
        )
    scores = list(scores)
    if len(scores) != len(vectors):
        raise TaskArithError(f"got {len(scores)} score maps for {len(vectors)} vectors; pass one per vector, in order")
    eligible = []
    for i, s in enumerate(scores):
        if not isinstance(s, Mapping):
            raise TaskArithError(f"scores[{i}] is a {type(s).__name__}; each score map is a mapping name -> tensor")
        required = list(first._layout.slots)
        present = [n for n in s if n in first]  # aliases of tied weights may be left out
        check_same_keys(required, [n for n in s if n not in first._layout.aliases],
                        what=f"vector vs scores[{i}]", fix="Score maps need the vector's names, e.g. its attributions.")
        problems = []
        for n in present:
            t = s[n]
            if not isinstance(t, torch.Tensor):
                problems.append(f"{n!r}: {type(t).__name__} is not a tensor")
            elif tuple(t.shape) != first._layout.shape(n):
                problems.append(f"{n!r}: vector {first._layout.shape(n)} vs score {tuple(t.shape)}")
            elif t.is_complex() or t.dtype == torch.bool:
                problems.append(f"{n!r}: scores must be real numbers, got {t.dtype}")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append(f"{n!r}: holds NaN or inf")
        raise_if_any(problems, error=ShapeMismatchError, header=f"scores[{i}] does not fit the vectors",
                     fix="Pass finite scores shaped like the vector, one tensor per name.")
        maps = {}
        for n in names:
            t = s[n].detach().to(first.device)
            t = t.double() if t.dtype == torch.float64 else t.float()
            maps[n] = t
        eligible.append(maps)
    return eligible


def tune_scale(
    pretrained: Source,
    vector: TaskVector,
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    strict: bool = True,
) -> float:
    """The scale λ in ``grid`` whose model ``θ0 + λ·τ`` scores best on ``evaluate``.

    Tuned on held-out data, λ is where task arithmetic and merging methods
    differ most: the best λ of one method can be ten times another's.

    Args:
        pretrained: the base model θ0 (module, state_dict or file).
        vector: the task vector τ (e.g. a sum, or a :func:`consolidate` result).
        evaluate: called with each candidate state_dict; returns a real number,
            higher is better (return ``-loss`` for a loss). Evaluate on
            validation data, not on the data you report.
        grid: candidate λ values, tried in order; the first best one wins.
        strict: passed to :meth:`TaskVector.apply_to` (``False`` for a vector
            covering part of the model).

    Returns:
        The best λ, a float.

    Example:
        >>> import torch, taskarith as ta
        >>> tv = ta.TaskVector({"w": torch.tensor([1.0])})
        >>> ta.attribution.tune_scale({"w": torch.tensor([0.0])}, tv, lambda s: -abs(s["w"].item() - 0.5))
        0.5
    """
    if not isinstance(vector, TaskVector):
        raise TaskArithError(f"tune_scale needs a TaskVector, got {type(vector).__name__}")
    if not callable(evaluate):
        raise TaskArithError(f"evaluate must be a callable state_dict -> score, got {type(evaluate).__name__}")
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise TaskArithError(f"grid must be a non-empty sequence of numbers, got {grid!r:.80}")
    bad = [repr(g) for g in grid if not _is_real(g) or not math.isfinite(g)]
    raise_if_any(bad, error=TaskArithError, header="grid holds values that are not finite real numbers",
                 fix="Pass λ values such as (0.1, 0.2, ..., 3.0).")
    state = load_state_dict(pretrained)
    best, best_score = None, -math.inf
    for lam in grid:
        score = evaluate(vector.apply_to(state, float(lam), strict=strict))
        if isinstance(score, torch.Tensor) and score.numel() == 1 and not score.is_complex():
            score = score.item()
        if not _is_real(score) or math.isnan(score):
            raise TaskArithError(
                f"evaluate returned {score!r:.60} for λ={lam}; it must return a real number (higher is better)"
            )
        if best is None or score > best_score:
            best, best_score = float(lam), score
    return best
