"""PE diagnostics: Psi_hat and information gain in StepResult.info, the withheld-feedback ablation,
and exact Bayesian (oracle) belief tracking. Same hand table as test_pe_env.py:
D = 3, w* = (1, 1, 2); pair 1,3 is dominated, pairs 1,2 / 2,3 / 4,5 are not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.pe.geometry import cosine
from verl_selflock.envs.pe.oracle import PEVersionSpace, oracle_belief, seed_of
from verl_selflock.envs.pe.prompts import FEEDBACK_PREFIX

MOVIES = [[3, 1, 2], [1, 2, 0], [0, 0, 1], [4, 3, 3], [2, 4, 1]]
W_STAR = [1.0, 1.0, 2.0]
SPEC = {"task": "pe", "variant": "full", "D": 3, "movies": MOVIES, "w_star": W_STAR, "max_turns": 10, "id": "t-1"}


def act(pair: str) -> str:
    return f"<interact>\nPair: {pair}\n</interact>"


def test_info_gain_and_psi_follow_the_version_space():
    env = make_env(SPEC)
    dominated = env.step_sync(act("1,3"))
    assert dominated.info["info_gain"] == 0.0  # every draw agrees: 0 bits
    env.step_sync("<interact>Guess: 1,1,2</interact>")
    informative = env.step_sync(act("1,2"))
    # Same seeded draws as the env's: the answer keeps a fraction f of them, the gain is -log2 f.
    space = PEVersionSpace(3, seed=seed_of(SPEC))
    expected = space.observe(np.array([2.0, -1.0, 2.0]), "Yes.")
    assert informative.info["info_gain"] == pytest.approx(expected) and 0 < expected < 1
    update = env.step_sync("<interact>Guess: 1,1,1</interact>")
    assert update.info["psi"] == pytest.approx(cosine(np.array([1.0, 1, 1]), np.array(W_STAR)))
    assert update.info["psi_prev"] == pytest.approx(1.0)  # the previous guess was w* itself
    invalid = env.step_sync("<interact>Pair: 9,9</interact>")
    assert invalid.info["info_gain"] == 0.0


def test_withheld_feedback_shows_unknown_and_keeps_critiques():
    real = make_env(SPEC)
    withheld = make_env(SPEC, context=EnvContext(training=False, withhold_feedback=True))
    assert type(withheld).uninformative_feedback == "Unknown."
    a, b = real.step_sync(act("1,2")), withheld.step_sync(act("1,2"))
    assert a.observation.startswith(FEEDBACK_PREFIX + "Yes.")
    assert b.observation.startswith(FEEDBACK_PREFIX + "Unknown.\n") and "movie 1" not in b.observation
    assert b.info["feedback"] == "Unknown." and b.info["info_gain"] == 0.0
    assert a.label == b.label  # critiques do not depend on what was shown
    assert a.observation.split("\n", 1)[1] == b.observation.split("\n", 1)[1]  # the instructions are unchanged


def test_oracle_belief_converges_with_informative_answers():
    rng = np.random.default_rng(3)
    D = 4
    movies = rng.integers(0, 20, size=(10, D)).astype(float)
    w_star = np.array([0.1, 0.5, 0.3, 0.1])
    spec = {"D": D, "movies": movies.tolist(), "w_star": w_star.tolist(), "id": "x", "seed": 0}
    queries = []
    for i in range(1, 11):
        for j in range(i + 1, 11):
            diff = movies[i - 1] - movies[j - 1]
            word = "Yes." if w_star @ diff > 0 else "No."
            queries.append(([i, j], None, word))
    none = oracle_belief(spec, [])
    full = oracle_belief(spec, queries)
    assert none.answers_used == 0 and none.n_consistent == 2048
    assert full.psi > 0.97 > none.psi and full.reward == 1.0
    withheld = oracle_belief(spec, [(p, f, "Unknown.") for p, f, _ in queries])
    assert withheld.belief == none.belief  # "Unknown." carries nothing
    space = PEVersionSpace(2, seed=0, n_samples=16)
    assert math.isnan(space.observe(np.array([1.0, 1.0]), "No.")) and space.n_consistent == 16  # impossible answer
