"""EASE against closed forms worked out by hand and an independent numpy inverse."""
import numpy as np
import pytest

from trainer.ease import (_symmetrize_from_lower, click_matrix, ease_scores, ease_weights,
                          fit_ease, gram)
from trainer.evaluation import EvalSet


def test_two_items_closed_form():
    # users: 0 clicked {0, 1}, 1 clicked {0}, 2 clicked {0, 1}, 3 clicked {1}
    x = click_matrix(np.array([0, 0, 1, 2, 2, 3, 3]), np.array([0, 1, 0, 0, 1, 1, 1]), 4, 2)
    g = gram(x)
    # G = [[3, 2], [2, 3]]: the duplicate (3, 1) click counts once
    np.testing.assert_array_equal(g, [[3, 2], [2, 3]])
    # P = inv([[a+λ, c], [c, b+λ]]) -> B[0, 1] = c / (a + λ), B[1, 0] = c / (b + λ)
    b = ease_weights(g, 1.0)
    np.testing.assert_allclose(b, [[0, 2 / 4], [2 / 4, 0]], rtol=1e-6)
    np.testing.assert_array_equal(g, [[3, 2], [2, 3]])  # the Gram matrix is reused, unchanged
    # user 1 (clicked item 0 only) scores item 1 with B[0, 1]
    np.testing.assert_allclose(ease_scores(x, b)(np.array([1])), [[0.0, 0.5]], rtol=1e-6)


def test_matches_a_direct_inverse():
    rng = np.random.default_rng(3)
    dense = (rng.random((40, 30)) < 0.2).astype(np.float32)
    users, items = np.nonzero(dense)
    g = gram(click_matrix(users, items, 40, 30))
    for l2 in (0.5, 10.0):
        p = np.linalg.inv(dense.T.astype(np.float64) @ dense + l2 * np.eye(30))
        expected = -p / np.diag(p)[None, :]
        np.fill_diagonal(expected, 0.0)
        np.testing.assert_allclose(ease_weights(g, l2), expected, rtol=2e-4, atol=1e-6)


def test_symmetrize_copies_lower_triangle_blockwise():
    m = np.tril(np.arange(49, dtype=np.float32).reshape(7, 7)) + np.triu(np.full((7, 7), -1.0), 1)
    _symmetrize_from_lower(m, block=3)
    expected = np.tril(np.arange(49, dtype=np.float32).reshape(7, 7))
    expected = expected + np.tril(expected, -1).T
    np.testing.assert_array_equal(m, expected)


def test_l2_is_chosen_on_validation_and_refitted_on_train():
    # Items 0 and 1 always co-occur; user 3 has only item 0 in the fit split and
    # item 1 held out (validation). Item 2 is a popular distractor.
    fit_users = np.array([0, 0, 1, 1, 2, 2, 3, 4, 5, 6])
    fit_items = np.array([0, 1, 0, 1, 2, 0, 0, 2, 2, 2])
    validation = EvalSet(np.array([3]), np.array([1]), fit_users, fit_items, 3,
                         np.bincount(fit_items, minlength=3).astype(float))
    train = EvalSet(np.array([4]), np.array([0]), np.append(fit_users, 3),
                    np.append(fit_items, 1), 3, np.zeros(3))
    result = fit_ease(train, 7, validation, l2_grid=(0.1, 1.0, 1000.0), k=1)
    assert result.skipped == ""
    assert result.selection_metric == "hr@1"
    assert set(result.validation) == {0.1, 1.0, 1000.0}
    assert result.validation[result.l2] == max(result.validation.values())
    assert result.validation[0.1] == 1.0  # small λ: item 1 co-occurs with item 0
    # the returned model is fitted on train's clicks (user 3 now also has item 1)
    x = click_matrix(train.seen_users, train.seen_items, 7, 3)
    np.testing.assert_allclose(result.score_fn(np.array([3, 4])),
                               ease_scores(x, ease_weights(gram(x), result.l2))(np.array([3, 4])))


def test_skipped_above_the_size_limit():
    data = EvalSet(np.array([0]), np.array([0]), np.array([0]), np.array([1]), 50, np.ones(50))
    result = fit_ease(data, 1, data, max_items=49)
    assert result.score_fn is None
    assert "50 items" in result.skipped and "49" in result.skipped


def test_rejects_non_positive_l2():
    with pytest.raises(ValueError, match="l2 must be positive"):
        ease_weights(np.eye(2, dtype=np.float32), 0.0)
