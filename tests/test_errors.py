"""Every bad input raises a TaskArithError that names the key and the fix."""

from __future__ import annotations

import pytest
import torch

import taskarith as ta


def sd(**tensors):
    return dict(tensors)


def test_errors_are_value_errors():
    assert issubclass(ta.TaskArithError, ValueError)
    for cls in (ta.KeyMismatchError, ta.ShapeMismatchError, ta.NonFiniteError, ta.BaseMismatchError):
        assert issubclass(cls, ta.TaskArithError)


def test_key_mismatch_lists_every_missing_and_extra_name_once():
    base = sd(a=torch.zeros(1), b=torch.zeros(1), c=torch.zeros(1))
    tuned = sd(a=torch.zeros(1), d=torch.zeros(1), e=torch.zeros(1))
    with pytest.raises(ta.KeyMismatchError) as err:
        ta.TaskVector.from_models(base, tuned)
    message = str(err.value)
    assert err.value.missing == ["b", "c"] and err.value.extra == ["d", "e"]
    for name in "bcde":
        assert message.count(repr(name)) == 1, message
    assert "missing 2" in message and "extra 2" in message


def test_shape_mismatches_are_all_reported_with_both_shapes():
    base = sd(a=torch.zeros(2, 3), b=torch.zeros(4), c=torch.zeros(1))
    tuned = sd(a=torch.zeros(3, 2), b=torch.zeros(5), c=torch.zeros(1))
    with pytest.raises(ta.ShapeMismatchError) as err:
        ta.TaskVector.from_models(base, tuned)
    message = str(err.value)
    assert "'a': pretrained (2, 3) vs finetuned (3, 2)" in message
    assert "'b': pretrained (4,) vs finetuned (5,)" in message
    assert "'c'" not in message


def test_dtype_mismatch_names_the_key_and_both_dtypes():
    with pytest.raises(ta.ShapeMismatchError, match=r"'w': pretrained torch.float32 vs finetuned torch.bfloat16"):
        ta.TaskVector.from_models(sd(w=torch.zeros(2)), sd(w=torch.zeros(2, dtype=torch.bfloat16)))


def test_non_finite_deltas_are_reported_by_key_when_asked():
    base = sd(ok=torch.zeros(3), bad=torch.zeros(3), worse=torch.zeros(2))
    tuned = sd(ok=torch.ones(3), bad=torch.tensor([1.0, float("nan"), 2.0]), worse=torch.tensor([float("inf")] * 2))
    ta.TaskVector.from_models(base, tuned)  # not asked: no error
    with pytest.raises(ta.NonFiniteError) as err:
        ta.TaskVector.from_models(base, tuned, check_finite=True)
    message = str(err.value)
    assert "'bad' (1 of 3 entries)" in message and "'worse' (2 of 2 entries)" in message and "'ok'" not in message


def test_non_finite_results_of_apply_are_reported_when_asked():
    tv = ta.TaskVector(sd(w=torch.tensor([1e38, 0.0])))
    with pytest.raises(ta.NonFiniteError, match="'w'"):
        tv.apply_to(sd(w=torch.tensor([3e38, 0.0])), check_finite=True)


def test_integer_tensors_are_not_deltas():
    with pytest.raises(ta.TaskArithError, match=r"'steps' \(torch.int64\)"):
        ta.TaskVector(sd(w=torch.zeros(2), steps=torch.tensor(3)))


def test_non_tensor_values_are_named():
    with pytest.raises(ta.TaskArithError, match=r"'lr' \(float\)"):
        ta.TaskVector({"w": torch.zeros(1), "lr": 0.1})


def test_algebra_of_mismatched_vectors_names_the_keys():
    a = ta.TaskVector(sd(w=torch.zeros(2), b=torch.zeros(1)))
    with pytest.raises(ta.KeyMismatchError, match="missing 1: 'b'"):
        a + ta.TaskVector(sd(w=torch.zeros(2)))
    with pytest.raises(ta.ShapeMismatchError, match=r"'w': \(2,\) vs \(3,\)"):
        a - ta.TaskVector(sd(w=torch.zeros(3), b=torch.zeros(1)))
    with pytest.raises(ta.ShapeMismatchError, match="'w'"):
        a.dot(ta.TaskVector(sd(w=torch.zeros(3), b=torch.zeros(1))))


def test_apply_to_a_base_of_another_architecture_lists_all_problems():
    tv = ta.TaskVector(sd(w=torch.zeros(2, 2), b=torch.zeros(2), gone=torch.zeros(1)))
    with pytest.raises(ta.KeyMismatchError) as err:
        tv.apply_to(sd(w=torch.zeros(2, 2), b=torch.zeros(2), new=torch.zeros(1)))
    assert err.value.missing == ["gone"] and err.value.extra == ["new"]
    assert "strict=False" in str(err.value)
    with pytest.raises(ta.ShapeMismatchError) as err:
        tv.apply_to(sd(w=torch.zeros(3, 2), b=torch.zeros(5), gone=torch.zeros(1)))
    assert "'w': vector (2, 2) vs base (3, 2)" in str(err.value) and "'b': vector (2,) vs base (5,)" in str(err.value)


def test_strict_false_copies_uncovered_base_entries():
    tv = ta.TaskVector(sd(w=torch.ones(2)))
    out = tv.apply_to(sd(w=torch.zeros(2), extra=torch.full((2,), 7.0)), strict=False)
    assert out["w"].tolist() == [1.0, 1.0] and out["extra"].tolist() == [7.0, 7.0]


def test_a_float_delta_for_an_integer_base_entry_is_refused():
    tv = ta.TaskVector(sd(steps=torch.zeros(())))
    with pytest.raises(ta.ShapeMismatchError, match="'steps': base entry is torch.int64"):
        tv.apply_to(sd(steps=torch.tensor(3)))


@pytest.mark.parametrize("bad", ["2", [1.0], torch.ones(2), True, 1j])
def test_bad_scalars_are_refused(bad):
    tv = ta.TaskVector(sd(w=torch.ones(2)))
    with pytest.raises((TypeError, ta.TaskArithError)):
        tv * bad
    with pytest.raises(ta.TaskArithError, match="0-d tensor"):
        tv.mul_(bad)
    with pytest.raises(ta.TaskArithError, match="0-d tensor"):
        tv.apply_to(sd(w=torch.ones(2)), bad)


def test_division_by_zero_raises():
    tv = ta.TaskVector(sd(w=torch.ones(2)))
    with pytest.raises(ZeroDivisionError):
        tv / 0
    with pytest.raises(ZeroDivisionError):
        tv.div_(0.0)


def test_invalid_options_are_refused():
    tv = ta.TaskVector(sd(w=torch.ones(2)))
    with pytest.raises(ta.TaskArithError, match="on_base_mismatch"):
        tv.apply_to(sd(w=torch.ones(2)), on_base_mismatch="sometimes")
    with pytest.raises(ta.TaskArithError, match="floating-point"):
        ta.TaskVector.from_models(sd(w=torch.ones(2)), sd(w=torch.ones(2)), dtype=torch.int32)
    with pytest.raises(ta.TaskArithError, match="floating-point"):
        tv.to(dtype=torch.int64)
    with pytest.raises(ta.TaskArithError, match="2 weights for 1 vectors"):
        ta.TaskVector.sum([tv], weights=[1.0, 2.0])
    with pytest.raises(ta.TaskArithError, match="at least one"):
        ta.TaskVector.sum([])


def test_weights_tied_in_one_model_but_different_in_the_other_are_refused():
    shared = torch.ones(2)
    tuned = {"embed": shared, "head": shared}
    base = {"embed": torch.zeros(2), "head": torch.full((2,), 5.0)}
    with pytest.raises(ta.TaskArithError, match="'head' and 'embed'"):
        ta.TaskVector.from_models(base, tuned)


def test_unreadable_sources_say_what_is_accepted():
    with pytest.raises(ta.TaskArithError, match="nn.Module"):
        ta.TaskVector.from_models(42, {})
    with pytest.raises(ta.TaskArithError, match="from_models"):
        ta.TaskVector([torch.ones(1)])


def test_comparing_vectors_with_double_equals_points_to_equal():
    tv = ta.TaskVector(sd(w=torch.ones(2)))
    with pytest.raises(TypeError, match="equal"):
        tv == tv  # noqa: B015
