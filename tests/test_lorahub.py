"""lorahub.py: the search lowers its objective and never reports a score its weights do not give;
the stage itself runs in the smoke pipeline (test_eval.py checks its weights in eval.json)."""
import numpy as np
import pytest

from lorahub import BOUND, search


def test_the_search_never_rises_stays_in_bounds_and_its_weights_give_its_score():
    target = np.array([1.2, -0.7, 0.3, 0.0])
    seen = []

    def objective(w):
        seen.append(w.copy())
        return float(((w - target) ** 2).sum() + 0.05 * np.abs(w).sum())
    w, f, history = search(objective, 4, 40, seed=0)
    assert len(history) == len(seen) == 40
    assert all(b <= a for a, b in zip(history, history[1:])) and history[-1] == f
    assert f < history[0] / 4  # it really moves from the uniform start toward the target
    assert np.all(np.abs(np.array(seen)) <= BOUND) and np.allclose(seen[0], 0.25)
    assert objective(w) == f  # the chosen weights reproduce the reported score
    again = search(objective, 4, 40, seed=0)
    assert np.array_equal(again[0], w)  # seeded
    assert not np.array_equal(search(objective, 4, 40, seed=1)[0], w)
