"""The compiled kernels take any number of inputs, each count computing what the torch path does.

Each count compiles a kernel of its own: every kernel runs here at 1 to 17 inputs (past the four
input slots the kernels once had, and past 16) and its result is compared with the torch path's
bit for bit. tests/test_numba.py draws the edge values at a few counts; the Triton kernels' counts
are in tests/test_triton.py.
"""

import math
from unittest import mock

import pytest
import torch

pytest.importorskip("numba", reason="the compiled kernels need Numba")

from helpers import backend

import taskarith as ta
from taskarith.backends import _numba
from taskarith.merging import _trim

COUNTS = [1, 2, 3, 4, 5, 8, 16, 17]
DTYPES = [torch.float32, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns of a float tensor (so -0.0 differs from 0.0)."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view({2: torch.int16, 4: torch.int32}[flat.element_size()])


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(bits(got), bits(want))


def vectors(k: int, dtype: torch.dtype, seed: int = 0) -> list[ta.TaskVector]:
    """``k`` vectors whose small-integer tensor ties at every trim threshold (so that trims carry
    cuts), with signed zeros and infinities among ordinary values."""
    g = torch.Generator().manual_seed(seed)

    def one() -> ta.TaskVector:
        ties = torch.randint(-3, 4, (900,), generator=g).float()
        ties[::97] = -0.0
        wide = torch.randn(40, 30, generator=g) * 10
        wide[0, :3] = torch.tensor([math.inf, -math.inf, -0.0])
        return ta.TaskVector({"q": ties.to(dtype), "w": wide.to(dtype), "b": torch.randn(7, generator=g).to(dtype)})

    return [one() for _ in range(k)]


@pytest.mark.parametrize("sign", ["sum", "count"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("k", COUNTS)
def test_ties_kernel_takes_any_number_of_inputs(k, dtype, sign):
    vs = vectors(k, dtype, seed=k)
    assert _trim.trim_plan(vs[0], 0.3, "tensor").cuts, "the premise: trims with tie cuts"
    for scope in ["tensor", "global"]:
        for weights, scale in [(None, 1.0), ([(-1.0) ** i * (i + 0.5) for i in range(k)], 0.7)]:
            options = {"density": 0.3, "scope": scope, "sign": sign, "weights": weights, "scale": scale}
            with backend("torch"):
                want = ta.merge(vs, "ties", **options)
            with backend("numba"), mock.patch.object(_numba, "ties_merge", wraps=_numba.ties_merge) as spy:
                got = ta.merge(vs, "ties", **options)
            assert spy.called, f"{k} inputs: the kernel ran"
            for name in want:
                assert same_bits(got[name], want[name]), f"{k} inputs, {options}: {name!r} differs"


@pytest.mark.parametrize("k", [8, 16])
def test_ties_of_many_vectors_equals_the_torch_backend(k):
    vs = vectors(k, torch.float32, seed=100 + k)
    with backend("torch"):
        want = ta.merge(vs, "ties", density=0.3)
    with mock.patch.object(_numba, "ties_merge", wraps=_numba.ties_merge) as spy:
        got = ta.merge(vs, "ties", density=0.3)
    assert spy.called == _numba.enabled()
    for name in want:
        assert same_bits(got[name], want[name]), f"{k} vectors: {name!r} differs"


def _summands(k: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Values whose partial sums land halfway between bfloat16 neighbours, overflow to +inf, and
    cancel to zeros of either sign (no -inf: inf - inf is a NaN, whose bits differ between torch's
    vector and scalar code)."""
    g = torch.Generator().manual_seed(k * 7 + n)
    choices = torch.tensor([1.0, 1.0 + 2**-7, 2**-8, 2**-9, -(2**-8), -1.0, 0.0, -0.0, 3e38, 1e-3])
    return [torch.where(torch.rand(n, generator=g) < 0.5, choices[torch.randint(0, len(choices), (n,), generator=g)],
                        torch.randn(n, generator=g)).to(dtype) for _ in range(k)]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("k", COUNTS)
def test_running_sum_takes_any_number_of_inputs(k, dtype, stream):
    n = 9000 + k  # whole streamed blocks and a tail
    inputs = _summands(k, n, dtype)
    out = torch.full((n,), math.nan, dtype=dtype)
    threshold = 0 if stream else 1 << 62
    with backend("numba"), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), mock.patch.object(_numba, "STREAM_FROM", threshold):
        taken = _numba.running_sum(out, inputs)
    # One input is no sum; two float32 ones add in one torch pass already, which only streaming
    # stores beat (torch's bfloat16 add converts in several steps: the kernel takes those).
    assert bool(taken) == (k > 2 or (k == 2 and (stream or dtype == torch.bfloat16)))
    if taken:
        want = inputs[0] + inputs[1]
        for x in inputs[2:]:
            want.add_(x)
        assert same_bits(out, want), f"{k} inputs differ"


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, True), (torch.bfloat16, torch.float32, False),
                                    (torch.bfloat16, torch.bfloat16, True), (torch.float32, torch.float32, False)],
                         ids=["bf16-to-f32-checked", "bf16-to-f32", "bf16-checked", "f32"])
@pytest.mark.parametrize("misses", [False, True], ids=["round-trips", "misses"])
@pytest.mark.parametrize("k", COUNTS)
def test_add_deltas_takes_any_number_of_inputs(k, dtypes, misses):
    dtype, out_dtype, checked = dtypes
    n = 3000
    g = torch.Generator().manual_seed(k)
    base = torch.randn(n, generator=g).to(dtype)
    tuned = [(base.double() + torch.randn(n, generator=g) * 10.0 ** -(i % 4)).to(dtype) for i in range(k)]
    if misses:  # a bfloat16 delta whose float32 sum with the base misses the fine-tuned value
        base[17], tuned[-1][17] = 1.0, 2.0**-30
    wide = base.float()
    total = tuned[0].float() - wide
    for t in tuned[1:]:
        total += t.float() - wide
    want = (wide + total).to(out_dtype)
    out = torch.empty(n, dtype=out_dtype)
    with backend("numba"):
        done = _numba.add_deltas(out, base, tuned, checked=checked)
    misses_check = misses and checked and dtype != torch.float32
    assert done == (not misses_check), f"{k} inputs: the check's verdict"
    if done:
        assert same_bits(out, want), f"{k} inputs differ"


def test_more_inputs_than_a_kernel_takes_go_to_the_torch_path():
    k = _numba.MAX_INPUTS + 1
    inputs = [torch.ones(10) for _ in range(k)]
    with backend("numba"), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0):
        assert not _numba.running_sum(torch.empty(10), inputs)
        assert _numba.add_deltas(torch.empty(10), torch.zeros(10), inputs, checked=False) is None


def test_ties_at_the_most_inputs_a_kernel_takes():
    """Its tuples of more than 16 items are built in parts (Python builds longer ones through a
    list, which Numba does not compile). Compiling it takes ~10 s; the folds of the other kernels
    build no tuples."""
    test_ties_kernel_takes_any_number_of_inputs(_numba.MAX_INPUTS, torch.float32, "sum")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
@pytest.mark.parametrize("k", [2, 3, 5, 16])
def test_wide_sum_is_a_float32_sum_rounded_once(k, stream):
    """The kernel of task arithmetic on bfloat16 vectors: summed in float32, one rounding at the end."""
    n = 9000 + k
    inputs = _summands(k, n, torch.bfloat16)
    out = torch.full((n,), math.nan, dtype=torch.bfloat16)
    threshold = 0 if stream else 1 << 62
    with backend("numba"), mock.patch.object(_numba, "STREAM_FROM", threshold):
        assert _numba.wide_sum(out, inputs)
    want = inputs[0].float() + inputs[1].float()
    for x in inputs[2:]:
        want.add_(x.float())
    assert same_bits(out, want.to(torch.bfloat16))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_task_arithmetic_on_bfloat16_is_the_same_on_every_path(k):
    vs = vectors(k, torch.bfloat16, seed=3)
    with backend("torch"):
        want = ta.merge(vs, "task_arithmetic")
    with backend("numba"):
        got = ta.merge(vs, "task_arithmetic")
    assert all(same_bits(got[n], want[n]) for n in want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_compiled_dot_is_float64_accurate_and_independent_of_threads(dtype):
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(300_007, generator=g).to(dtype) for _ in range(2))
    want = math.fsum((a.double() * b.double()).tolist())  # float64 products of narrower floats are exact
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with backend("numba"):
                got.append(_numba.dot64(a, b))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1], "the chunks, not the threads, fix the order of the additions"
    assert abs(got[0] - want) <= 1e-12 * math.fsum(abs(x) for x in (a.double() * b.double()).tolist())
