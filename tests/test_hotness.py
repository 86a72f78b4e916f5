import json

import numpy as np
import pytest

from dynaexq_jax.policies.hotness import (
    HotnessTracker,
    global_capacity,
    per_layer_capacity,
    plan_swaps,
    routing_concentration,
    select_resident,
)


def served_mass(scores, capacity):
    """Sum of the scores of each layer's top-capacity experts: the pairs served at high precision."""
    top = -np.sort(-scores, axis=1)
    return sum(top[l, :c].sum() for l, c in enumerate(capacity))


# --- HotnessTracker ----------------------------------------------------------------------


def test_score_halves_after_one_half_life_without_traffic():
    t = HotnessTracker(2, 3, half_life_steps=100, scores=np.ones((2, 3)))
    t.update(np.zeros((2, 3)), tokens=100, steps=100)
    np.testing.assert_allclose(t.scores, 0.5)
    t.update(np.zeros((2, 3)), tokens=200, steps=200)
    np.testing.assert_allclose(t.scores, 0.125)


def test_score_converges_to_per_token_rate():
    t = HotnessTracker(1, 2, half_life_steps=50)
    mass = np.array([[30.0, 6.0]])  # per 10 tokens: rates 3.0 and 0.6
    t.update(mass * 5, tokens=50, steps=50)  # one half-life from zero: halfway to the rate
    np.testing.assert_allclose(t.scores, [[1.5, 0.3]])
    for _ in range(200):
        t.update(mass, tokens=10, steps=10)
    np.testing.assert_allclose(t.scores, [[3.0, 0.6]], rtol=1e-9)


def test_update_frequency_does_not_change_scores():
    rng = np.random.default_rng(0)
    start = rng.random((4, 8))
    rate = rng.random((4, 8)) * 8
    once = HotnessTracker(4, 8, half_life_steps=300, scores=start)
    twice = HotnessTracker(4, 8, half_life_steps=300, scores=start)
    once.update(rate * 2 * 37, tokens=2 * 37, steps=2 * 37)
    twice.update(rate * 37, tokens=37, steps=37)
    twice.update(rate * 37, tokens=37, steps=37)
    np.testing.assert_allclose(once.scores, twice.scores, rtol=1e-12)


def test_the_horizon_is_in_steps_whatever_the_batch_size():
    """16 steps at batch 32 move the estimate exactly as much as 16 steps at batch 1."""
    rate = np.array([[0.5, 0.1, 0.0]])
    one = HotnessTracker(1, 3, half_life_steps=256, scores=np.full((1, 3), 0.2))
    many = HotnessTracker(1, 3, half_life_steps=256, scores=np.full((1, 3), 0.2))
    one.update(rate * 16, tokens=16, steps=16)
    many.update(rate * 16 * 32, tokens=16 * 32, steps=16)
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-12)
    # The old token horizon would have decayed the batch-32 estimate 32 times faster.
    assert many.scores[0, 2] == pytest.approx(0.2 * 0.5 ** (16 / 256))


def test_a_prompt_weighs_like_the_decode_steps_it_replaces():
    """A prefill of T tokens per row decays a warm profile as T decode steps would, not T x batch."""
    warm = np.array([[0.9, 0.0]])
    prompt = np.array([[0.0, 1.0]])
    for batch in (1, 8):
        t = HotnessTracker(1, 2, half_life_steps=256, scores=warm)
        t.update(prompt * 64 * batch, tokens=64 * batch, steps=64)
        np.testing.assert_allclose(t.scores, [[0.9 * 0.5 ** 0.25, 1 - 0.5 ** 0.25]], rtol=1e-12)


def test_the_resident_set_follows_a_workload_shift_within_the_horizon():
    """A routing trace whose hot set moves at step 400: the top-4 resident set, decided every 16
    steps with hysteresis and 4 swaps per decision, follows it about one half-life later (the
    new experts' rate passes the old ones' decayed rate at 0.5 ** (t / h) ~ 0.475)."""
    E, cap, half_life, every = 16, 4, 128, 16
    rng = np.random.default_rng(0)
    hot_a, hot_b = np.arange(4), np.arange(8, 12)
    t = HotnessTracker(1, E, half_life_steps=half_life)
    resident = np.zeros((1, E), bool)
    caught_up = None
    for step in range(0, 800, every):
        hot = hot_a if step < 400 else hot_b
        mass = np.full(E, 0.01)
        mass[hot] = 0.2
        t.update(mass[None] * every * (1 + 0.1 * rng.random(E)), tokens=every, steps=every)
        resident = select_resident(t.scores, [cap], resident, hysteresis=0.01, max_swaps_per_layer=4)
        if step >= 400 and caught_up is None and set(np.flatnonzero(resident[0])) == set(hot_b):
            caught_up = step + every - 400
    assert set(np.flatnonzero(resident[0])) == set(hot_b)
    assert caught_up is not None and half_life / 2 < caught_up <= 1.1 * half_life + every  # steps after the shift


def test_update_rejects_bad_input_and_ignores_empty_step():
    t = HotnessTracker(2, 3, half_life_steps=10, scores=np.full((2, 3), 0.2))
    with pytest.raises(ValueError, match="shape"):
        t.update(np.zeros((3, 2)), tokens=1, steps=1)
    with pytest.raises(ValueError, match="tokens is 0"):
        t.update(np.ones((2, 3)), tokens=0, steps=1)
    with pytest.raises(ValueError, match="steps"):
        t.update(np.ones((2, 3)), tokens=3, steps=0)
    t.update(np.zeros((2, 3)), tokens=0, steps=0)
    np.testing.assert_allclose(t.scores, 0.2)
    with pytest.raises(ValueError):
        t.scores[0, 0] = 1.0  # read-only: state changes only through update


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    t = HotnessTracker(3, 5, half_life_steps=1234.5, scores=rng.random((3, 5)))
    path = tmp_path / "hot.json"
    t.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["hot.json"]  # no temp file left behind
    assert set(json.loads(path.read_text())) == {"written_by", "layers", "experts", "half_life_steps", "scores"}

    back = HotnessTracker.load(path, expect_shape=(3, 5))
    assert (back.num_layers, back.num_experts, back.half_life_steps) == (3, 5, 1234.5)
    np.testing.assert_array_equal(back.scores, t.scores)
    assert HotnessTracker.load(path, half_life_steps=10).half_life_steps == 10


def test_load_profile_of_other_model_names_both_shapes(tmp_path):
    path = tmp_path / "hot.json"
    HotnessTracker(48, 128, half_life_steps=100).save(path)
    with pytest.raises(ValueError) as err:
        HotnessTracker.load(path, expect_shape=(24, 60))
    msg = str(err.value)
    assert "\n" not in msg
    assert "48" in msg and "128" in msg and "24" in msg and "60" in msg and "--hotness" in msg


def test_load_garbage_is_a_value_error(tmp_path):
    path = tmp_path / "hot.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="hotness profile .* is not valid JSON"):
        HotnessTracker.load(path)


# --- capacities --------------------------------------------------------------------------


def test_per_layer_capacity_splits_evenly_remainder_first_and_caps():
    np.testing.assert_array_equal(per_layer_capacity(10, 4, 8), [3, 3, 2, 2])
    np.testing.assert_array_equal(per_layer_capacity(0, 3, 8), [0, 0, 0])
    np.testing.assert_array_equal(per_layer_capacity(100, 3, 8), [8, 8, 8])


def test_global_capacity_with_no_information_equals_per_layer_rule():
    np.testing.assert_array_equal(global_capacity(np.zeros((4, 8)), 10), per_layer_capacity(10, 4, 8))


def test_global_capacity_follows_the_mass_and_respects_caps():
    scores = np.array([[9.0, 8.0, 7.0], [1.0, 0.5, 0.1]])
    np.testing.assert_array_equal(global_capacity(scores, 3), [3, 0])
    np.testing.assert_array_equal(global_capacity(scores, 4), [3, 1])
    np.testing.assert_array_equal(global_capacity(scores, 100), [3, 3])


def test_global_capacity_serves_at_least_as_much_mass_as_per_layer():
    rng = np.random.default_rng(2)
    strictly_better = 0
    for _ in range(50):
        layers, experts = 6, 32
        # Skewed routing whose concentration differs by layer (Zipf with per-layer exponent).
        exponent = rng.uniform(0.2, 2.5, size=(layers, 1))
        scores = rng.permuted(1.0 / np.arange(1, experts + 1) ** exponent, axis=1)
        scores /= scores.sum(axis=1, keepdims=True)
        slots = int(rng.integers(1, layers * experts))
        g, p = global_capacity(scores, slots), per_layer_capacity(slots, layers, experts)
        assert g.sum() == p.sum() == slots
        assert served_mass(scores, g) >= served_mass(scores, p) - 1e-12
        strictly_better += served_mass(scores, g) > served_mass(scores, p) + 1e-9
    assert strictly_better > 25


# --- select_resident ---------------------------------------------------------------------


def test_select_fills_empty_slots_with_hottest_positive_experts():
    scores = np.array([[0.0, 0.3, 0.1, 0.2], [0.0, 0.0, 0.0, 0.5]])
    target = select_resident(scores, [2, 3], np.zeros((2, 4), bool))
    np.testing.assert_array_equal(target, [[0, 1, 0, 1], [0, 0, 0, 1]])


def test_select_drops_weakest_when_capacity_shrinks():
    scores = np.array([[0.4, 0.1, 0.3, 0.2]])
    target = select_resident(scores, [2], np.ones((1, 4), bool))
    np.testing.assert_array_equal(target, [[1, 0, 1, 0]])


def test_select_swaps_only_beyond_the_absolute_margin():
    current = np.array([[True, False]])
    assert not select_resident(np.array([[0.100, 0.109]]), [1], current, hysteresis=0.01)[0, 1]
    assert select_resident(np.array([[0.100, 0.111]]), [1], current, hysteresis=0.01)[0, 1]


def test_ties_never_cause_churn():
    scores = np.full((1, 6), 0.2)
    for resident in ([0, 1], [4, 5], [1, 3]):
        current = np.zeros((1, 6), bool)
        current[0, resident] = True
        np.testing.assert_array_equal(select_resident(scores, [2], current, hysteresis=0.0), current)


def test_hysteresis_stops_thrash_between_alternating_experts():
    current = np.array([[True, False, False]])
    with_margin, without = 0, 0
    cur_m, cur_0 = current, current
    for step in range(20):
        wobble = 0.004 * (-1) ** step  # the two experts trade places by 0.008 < margin
        scores = np.array([[0.30 - wobble, 0.30 + wobble, 0.01]])
        new_m = select_resident(scores, [1], cur_m, hysteresis=0.01)
        new_0 = select_resident(scores, [1], cur_0, hysteresis=0.0)
        with_margin += len(plan_swaps(cur_m, new_m)[1])
        without += len(plan_swaps(cur_0, new_0)[1])
        cur_m, cur_0 = new_m, new_0
    assert with_margin == 0
    assert without >= 19


def test_max_swaps_limits_replacements_per_layer():
    scores = np.array([[0.0, 0.0, 0.0, 0.9, 0.8, 0.7]])
    current = np.array([[True, True, True, False, False, False]])
    target = select_resident(scores, [3], current, max_swaps_per_layer=2)
    np.testing.assert_array_equal(target, [[1, 0, 0, 1, 1, 0]])  # the two weakest incumbents go


def test_select_never_exceeds_capacity_on_random_sequences():
    rng = np.random.default_rng(3)
    layers, experts = 5, 16
    for _ in range(40):
        current = rng.random((layers, experts)) < rng.random()
        for _ in range(25):
            scores = rng.random((layers, experts)) ** rng.uniform(1, 6) * (rng.random((layers, experts)) < 0.8)
            capacity = rng.integers(0, experts + 3, size=layers)
            max_swaps = rng.choice([None, 0, 1, 4])
            target = select_resident(
                scores, capacity, current, hysteresis=rng.choice([0.0, 0.01, 0.1]), max_swaps_per_layer=max_swaps
            )
            resident = target.sum(axis=1)
            assert (resident <= np.minimum(capacity, experts)).all()
            for l in range(layers):
                # No slot is left empty while an expert with traffic waits outside.
                if resident[l] < min(capacity[l], experts):
                    assert not (scores[l] > 0)[~target[l]].any()
                # Replacements = promotions that did not fill a free slot.
                kept = min((current[l]).sum(), capacity[l])
                promoted = (target[l] & ~current[l]).sum()
                replaced = promoted - max(0, resident[l] - kept)
                assert max_swaps is None or replaced <= max_swaps
            current = target


# --- plan_swaps and reports --------------------------------------------------------------


def test_plan_swaps_demotes_first_and_orders_promotions_by_score():
    current = np.array([[1, 1, 0, 0], [0, 1, 0, 0]], bool)
    target = np.array([[1, 0, 1, 0], [1, 0, 0, 1]], bool)
    scores = np.array([[0.5, 0.1, 0.2, 0.0], [0.9, 0.0, 0.0, 0.2]])
    demotions, promotions = plan_swaps(current, target, scores)
    assert demotions == [(0, 1), (1, 1)]
    assert promotions == [(1, 0), (0, 2), (1, 3)]  # 0.9, then the 0.2 tie in (layer, expert) order
    assert plan_swaps(current, target)[1] == [(0, 2), (1, 0), (1, 3)]


def test_routing_concentration():
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    conc = routing_concentration(scores, fraction=0.25)
    np.testing.assert_allclose(conc[:2], [0.25, 1.0])
    assert np.isnan(conc[2])
