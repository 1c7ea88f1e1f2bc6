"""The public gradient checker itself: it must catch real bugs, not just pass correct code."""

import numpy as np
import pytest

import npgpt
from npgpt import layers as L
from npgpt.gradcheck import gradcheck, relative_error


def test_relative_error_closed_form():
    assert relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert relative_error([1.0, 0.0], [1.1, 0.0]) == pytest.approx(0.1 / 2.1)
    assert relative_error([0.0], [0.0]) == 0.0  # no division by zero
    assert relative_error([], []) == 0.0


def swish_forward(x):
    s = 1.0 / (1.0 + np.exp(-x))
    return x * s, (x, s)


def swish_backward(dout, cache):
    x, s = cache
    return dout * (s + x * s * (1.0 - s))


def test_a_users_correct_layer_passes():
    results = gradcheck(swish_forward, swish_backward, [np.random.default_rng(0).standard_normal((4, 5))])
    assert len(results) == 1 and results[0].passed
    assert results[0].input == "x" and results[0].n_checked == 20
    assert results[0].max_rel_error < 1e-8


def test_a_wrong_derivative_fails_and_says_where():
    def bad_backward(dout, cache):
        x, s = cache
        return dout * s  # forgot the x * s * (1 - s) term

    (r,) = gradcheck(swish_forward, bad_backward, [np.random.default_rng(0).standard_normal((4, 5))])
    assert not r.passed and r.max_rel_error > 1e-2
    assert r.worst_index is not None and len(r.worst_index) == 2
    assert "FAILED" in r.describe()


def test_random_upstream_catches_a_softmax_bug_that_all_ones_would_hide():
    """A softmax backward that forgets to multiply by p returns dout - sum(dout * p). For an all-ones
    upstream that is 0, exactly the true gradient (sum(p) = 1 is constant), so an all-ones check passes
    it; the random upstream that gradcheck uses exposes it."""

    def softmax_forward(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        return p, p

    def buggy_backward(dout, p):
        return dout - (dout * p).sum(-1, keepdims=True)  # missing the factor p

    z = np.random.default_rng(1).standard_normal((3, 5))
    p, _ = softmax_forward(z)
    assert np.allclose(buggy_backward(np.ones_like(p), p), 0.0)  # invisible with all ones
    (r,) = gradcheck(softmax_forward, buggy_backward, [z])
    assert not r.passed and r.max_rel_error > 0.1


def test_wrong_number_of_gradients_is_reported():
    res = gradcheck(L.linear_forward, lambda d, c: L.linear_backward(d, c)[:2],
                    [np.ones((2, 3)), np.ones((3, 4)), np.ones(4)])  # fmt: skip
    assert all(not r.passed for r in res)
    assert "returned 2 gradients" in res[0].note


def test_wrong_gradient_shape_is_reported():
    res = gradcheck(L.gelu_forward, lambda d, c: d[:1], [np.ones((2, 3))])
    assert not res[0].passed and "shape" in res[0].note


def test_a_backward_that_mutates_its_cache_fails():
    def forward(x):
        return 2 * x, {"x": x.copy()}

    def backward(dout, cache):
        cache["x"] *= 0  # forbidden
        return 2 * dout

    (r,) = gradcheck(forward, backward, [np.ones(3)])
    assert not r.passed and "cache" in r.note


def test_a_backward_that_mutates_dout_fails():
    def backward(dout, cache):
        dout *= 3  # forbidden
        return dout

    (r,) = gradcheck(lambda x: (x * 3, None), backward, [np.ones(3)])
    assert not r.passed and "dout" in r.note


def test_a_crashing_backward_is_a_failure_not_an_exception():
    def backward(dout, cache):
        raise RuntimeError("boom")

    (r,) = gradcheck(lambda x: (x, None), backward, [np.ones(2)])
    assert not r.passed and "boom" in r.note


def test_large_tensors_are_sampled_and_include_the_largest_entry():
    x = np.random.default_rng(0).standard_normal((40, 50))
    (r,) = gradcheck(L.gelu_forward, L.gelu_backward, [x], max_coords=30)
    assert r.n_total == 2000 and 30 <= r.n_checked <= 31
    assert r.passed


def test_integer_inputs_are_not_differentiated():
    res = gradcheck(L.embedding_forward, L.embedding_backward, [np.array([[0, 1, 1]]), np.ones((3, 2))])
    assert [r.input for r in res] == ["weight"]


def test_dict_inputs_are_checked_per_key():
    def forward(p):
        return p["a"] * p["b"], p

    def backward(dout, p):
        return {"a": dout * p["b"], "b": dout * p["a"]}

    rng = np.random.default_rng(0)
    res = gradcheck(forward, backward, [{"a": rng.standard_normal(3), "b": rng.standard_normal(3)}])
    assert [r.input for r in res] == ["p[a]", "p[b]"] and all(r.passed for r in res)


def test_format_results_table():
    res = gradcheck(swish_forward, swish_backward, [np.ones((2, 2))], layer="swish")
    table = npgpt.format_results(res)
    assert "layer" in table and "max rel error" in table and "swish" in table and "pass" in table


def test_inputs_are_not_modified_by_the_check():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    before = x.copy()
    gradcheck(L.gelu_forward, L.gelu_backward, [x])
    assert np.array_equal(x, before)


# --- gradients in the wrong order, per-tensor shape errors, the "checked" column, assert_gradients ----


def _linear_inputs(rng, n=2, c_in=3, c_out=4):
    return [rng.standard_normal((n, c_in)), rng.standard_normal((c_in, c_out)), rng.standard_normal(c_out)]


def test_gradients_returned_in_another_order_are_named_as_such():
    def swapped(dout, cache):
        dx, dweight, dbias = L.linear_backward(dout, cache)
        return dweight, dx, dbias

    res = gradcheck(L.linear_forward, swapped, _linear_inputs(np.random.default_rng(0)))
    assert [r.input for r in res] == ["x", "weight", "bias"] and not any(r.passed for r in res)
    for r in res:  # every row says what is wrong, not "gradient of x has shape (3, 4)"
        assert "gradients appear to be in a different order than the inputs (x, weight, bias)" in r.note
        assert "fit (weight, x, bias)" in r.note
        assert "expected" not in r.note


def test_equal_shapes_in_another_order_are_recognised_by_their_numbers():
    """x (3, 3) and a square weight (3, 3): the shapes cannot tell the two apart, the values can."""

    def forward(x, weight):
        return L.linear_forward(x, weight)

    def swapped(dout, cache):
        dx, dweight, _ = L.linear_backward(dout, cache)
        return dweight, dx

    rng = np.random.default_rng(1)
    res = gradcheck(forward, swapped, [rng.standard_normal((3, 3)), rng.standard_normal((3, 3))])
    assert not any(r.passed for r in res) and all(r.max_rel_error > 1e-2 for r in res)
    assert "gradients appear to be in a different order than the inputs (x, weight)" in res[0].note
    assert "the gradient returned for weight matches the finite differences of x" in res[0].note
    assert "the gradient returned for x matches the finite differences of weight" in res[1].note


def test_a_wrong_gradient_of_the_same_shape_is_not_called_a_reordering():
    def forward(a, b):
        return a * b, (a, b)

    def wrong(dout, cache):
        a, b = cache
        return dout * b, dout * b  # b's gradient should be dout * a

    rng = np.random.default_rng(2)
    ra, rb = gradcheck(forward, wrong, [rng.standard_normal(5), rng.standard_normal(5)])
    assert ra.passed and not rb.passed
    assert "order" not in rb.note


def test_a_wrong_shape_fails_only_its_own_row():
    def short_bias(dout, cache):
        dx, dweight, dbias = L.linear_backward(dout, cache)
        return dx, dweight, dbias[:2]

    rx, rw, rb = gradcheck(L.linear_forward, short_bias, _linear_inputs(np.random.default_rng(3)))
    assert rx.passed and rw.passed and rx.n_checked == 6 and rw.n_checked == 12
    assert not rb.passed and rb.note == "gradient of bias has shape (2,), expected (4,)"
    assert (rb.n_checked, rb.n_total) == (0, 4)


def test_the_table_says_how_many_coordinates_were_perturbed():
    rng = np.random.default_rng(123)
    x = rng.standard_normal((3, 4, 8))  # 96 coordinates, more than max_coords=64: sampled
    rx, rw, rb = gradcheck(L.layernorm_forward, L.layernorm_backward, [x, rng.standard_normal(8), rng.standard_normal(8)])
    assert rx.n_total == 96 and rx.n_checked in (64, 65) and (rw.n_checked, rw.n_total) == (8, 8)
    table = npgpt.format_results([rx, rw, rb])
    assert table.splitlines()[0].split() == ["layer", "input", "checked", "max", "rel", "error", "tol", "result"]
    assert f" {rx.n_checked}/96 " in table and " 8/8 " in table


def test_assert_gradients_passes_silently_and_fails_with_the_table():
    x = np.random.default_rng(4).standard_normal((4, 5))
    results = npgpt.assert_gradients(swish_forward, swish_backward, [x])
    assert len(results) == 1 and results[0].passed

    def bad_backward(dout, cache):
        x, s = cache
        return dout * s

    with pytest.raises(AssertionError) as info:
        npgpt.assert_gradients(swish_forward, bad_backward, [x], layer="swish")
    message = str(info.value)
    assert message.startswith("1 of 1 gradients disagree with finite differences")
    assert "max rel error" in message and "swish dx: rel error" in message and "FAILED at" in message


def test_assert_gradients_passes_keywords_to_gradcheck():
    x = np.random.default_rng(5).standard_normal((40, 50))
    (r,) = npgpt.assert_gradients(L.gelu_forward, L.gelu_backward, [x], max_coords=10, tol=1e-7)
    assert r.n_total == 2000 and 10 <= r.n_checked <= 11
