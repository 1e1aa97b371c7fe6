"""What a merge method is: its options, its declarations, and the block of work it is handed."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..backends import draws
from ..errors import TaskArithError

SPLITS = ("elementwise", "rows", "tensor")
INPUTS = ("deltas", "weights")


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: default, check and a phrase describing valid values."""

    default: object
    check: Callable[[object], bool]
    valid: str
    required: bool = False
    multiplies: bool = False  # the value multiplies deltas: refused where it overflows the merge's dtype


@dataclass(frozen=True)
class Block:
    """The work a merge method is handed: one tensor, or a block of its rows, of every input.

    Attributes:
        name: the canonical parameter name (options may depend on it).
        deltas: one tensor per input, in the compute dtype (float32 for half-precision deltas),
            all of the block's shape; already trimmed for methods registered with ``trim=True``.
        weights: one finite float per input.
        base: the pretrained values of the block, for methods registered with ``needs_base=True``
            (None otherwise).
        shape: the whole tensor's shape.
        start: the flat index of the block's first entry in the whole tensor.
        seed: the merge's ``seed`` option, for randomized methods.
        stats: the method's global statistic (``statistic=``), summed over the whole model.

    A method must compute the same bits for a block whatever the blocks around it: it may be
    handed the whole tensor (in memory) or any run of its rows (out of core, under a budget).
    """

    name: str
    deltas: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]
    base: torch.Tensor | None = None
    shape: tuple[int, ...] = ()
    start: int = 0
    seed: int | None = None
    stats: object = None

    @property
    def models(self) -> tuple[torch.Tensor, ...]:
        """The inputs of a method registered with ``inputs="weights"``: the models' weights (the
        same tuple as ``deltas``, named for what it holds)."""
        return self.deltas

    def random(self, i: int) -> torch.Tensor:
        """Uniform draws in [0, 1) (float32, the block's shape) for input ``i``: the same values for
        an entry however the tensor is split into blocks, on every device and thread count.

        They come from CPU generators keyed by ``(seed, i, name, chunk)`` over fixed chunks of
        the whole tensor.

        Example:
            >>> import torch
            >>> whole = Block("w", (torch.zeros(4, 3),), (1.0,), shape=(4, 3), seed=7)
            >>> rows = Block("w", (torch.zeros(2, 3),), (1.0,), shape=(4, 3), start=6, seed=7)
            >>> torch.equal(whole.random(0)[2:], rows.random(0))
            True
        """
        if self.seed is None:
            raise TaskArithError(f"Block.random needs a seed: register the method with randomized=True "
                                 f"and a 'seed' option (tensor {self.name!r})")
        like = self.deltas[i]
        values = draws.uniform(like.numel(), self.start, math.prod(self.shape), self.seed, i, self.name)
        return values.view(like.shape).to(like.device)


@dataclass(frozen=True)
class Method:
    """A registered merge method: ``fn(block, **options) -> merged delta of the block``.

    Declarations tell the drivers how they may run it:

    * ``split``: ``"elementwise"`` (entries are independent: any flat piece), ``"rows"`` (any run
      of rows of a tensor), or ``"tensor"`` (whole tensors only).
    * ``trim``: the engine first keeps the ``floor(density·n)`` largest magnitudes of each input
      (options ``density`` and ``scope``: per tensor or over the whole vector), exactly, in
      memory or streamed from disk; ``fn`` sees trimmed deltas.
    * ``statistic``: ``statistic(block, **options) -> tensor`` over fixed chunks of every tensor,
      summed in a fixed order (the tensors in sorted name order) into ``block.stats`` before any
      block is merged.
    * ``plan``: ``plan(shapes, deltas, **options) -> object``, computed once before any block from
      the options, the tensors' shapes (name -> shape, in sorted name order, whatever order the
      inputs hold them in) and, where it asks, ``deltas(name)``
      (every input's whole delta of that tensor), and handed to every block as ``block.stats`` (a
      selection decided over the whole model, for instance). Out of core, what it holds stays in
      memory for the whole merge.
    * ``needs_base``: ``fn`` reads ``block.base`` (merges need the pretrained model).
    * ``inputs``: ``"deltas"`` (``fn`` gets task vectors and returns the merged delta) or
      ``"weights"`` (``fn`` gets the models' weights as stored, in ``block.models``, and the base's
      in ``block.base``, and returns the merged weights: interpolations such as SLERP, and methods
      that reproduce another tool's arithmetic bit for bit). In memory, weights are rebuilt as
      ``base + delta`` in the base's dtype and the result is returned as a delta again.
    * ``randomized``: the method takes a ``seed`` option and draws with :meth:`Block.random`.
    * ``memory``: private bytes per entry per input that ``fn`` needs (sizes out-of-core blocks).
    * ``propagates_nan``: a NaN in any input reaches the result, so the NaN policy may check the
      (smaller) result instead of every input.
    * ``symmetric``: the result does not depend on the order of the inputs (weights moving with
      them), given exact arithmetic; ``identity``: options under which merging one vector of weight 1
      returns it. The conformance tests check both where declared.
    * ``fast``: optional ``fast(vectors, weights, **options)`` computing the same result for whole
      task vectors at once (packed kernels); the conformance tests hold it to ``fn`` bit for bit.
      With ``fast_checks_nan`` it returns ``(result, has_nan)``, having counted NaN results as it
      wrote them (``has_nan`` None: not counted), so the NaN policy skips its scan of the result.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    options: Mapping[str, Option] = field(default_factory=dict)
    split: str = "tensor"
    trim: bool = False
    statistic: Callable[..., torch.Tensor] | None = None
    plan: Callable[..., object] | None = None
    needs_base: bool = False
    randomized: bool = False
    memory: int = 16
    propagates_nan: bool = False
    symmetric: bool = False
    identity: Mapping[str, object] | None = None
    fast: Callable[..., Mapping[str, torch.Tensor]] | None = None
    fast_widens: bool = False  # ``fast`` takes half-precision vectors and widens them itself
    fast_checks_nan: bool = False  # ``fast`` returns (result, whether it holds a NaN, or None: unknown)
    inputs: str = "deltas"

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""

    @property
    def elementwise(self) -> bool:
        return self.split == "elementwise"


def check_declarations(name: str, options: Mapping[str, Option], split: str, trim: bool, randomized: bool,
                       statistic: object = None, plan: object = None, inputs: str = "deltas") -> None:
    """Refuse declarations a driver could not honour."""
    problems = []
    if inputs not in INPUTS:
        problems.append(f"inputs={inputs!r} is not one of {', '.join(INPUTS)}")
    if inputs == "weights" and (trim or statistic is not None or plan is not None):
        problems.append("inputs='weights' methods sparsify inside fn: declare no trim, statistic or plan")
    if statistic is not None and plan is not None:
        problems.append("statistic and plan both fill block.stats: declare one")
    if split not in SPLITS:
        problems.append(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if trim and not {"density", "scope"} <= set(options):
        problems.append("trim=True needs 'density' and 'scope' options (use taskarith.merging.DENSITY, SCOPE)")
    if randomized and "seed" not in options:
        problems.append("randomized=True needs a 'seed' option (use taskarith.merging.SEED)")
    if problems:
        raise TaskArithError(f"cannot register merge method {name!r}: " + "; ".join(problems))


# ----------------------------------------------------------------- option checks


def fraction(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[object], bool]:
    def check(x):
        if not finite(x):
            return False
        return (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    return check


def finite(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


SCALE = Option(1.0, finite, "a finite number", multiplies=True)
DENSITY = Option(0.2, fraction(0.0, 1.0, lo_open=True), "a number in (0, 1]")
SCOPE = Option("global", lambda x: x in ("global", "tensor"), "'global' or 'tensor'")
SIGN = Option("sum", lambda x: x in ("sum", "count"), "'sum' or 'count'")
DROP = Option(0.9, fraction(0.0, 1.0, hi_open=True), "a number in [0, 1)")
SEED = Option(None, integer, "an int", required=True)


def per_model(value, n: int) -> tuple:
    """An option given once for every model, or as a list with one value per model, as a tuple of ``n``.

    Example:
        >>> per_model(0.5, 3), per_model((0.1, 0.2), 2)
        ((0.5, 0.5, 0.5), (0.1, 0.2))
    """
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise TaskArithError(f"got {len(value)} per-model values {list(value)} for {n} models: give one value, "
                                 "or one per model")
        return tuple(value)
    return (value,) * n


def each(check: Callable[[object], bool]) -> Callable[[object], bool]:
    """``check`` applied to a value, or to every value of a per-model list."""
    return lambda x: all(check(v) for v in x) if isinstance(x, (list, tuple)) and x else check(x)


def promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype torch promotes a mix of ``dtypes`` to."""
    dtypes = list(dtypes)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out
