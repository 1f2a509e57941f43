"""Preference Estimation environment: every rule of :mod:`verl_selflock.envs.pe.env` on hand-computed cases.

Hand table (D = 3, w* = (1, 1, 2)); full scores: m1 = 8, m2 = 3, m3 = 2, m4 = 13, m5 = 8.

    pair  x_i - x_j      full: dominated?  feedback
    1,2   ( 2, -1,  2)   no                Yes (8 > 3)
    1,3   ( 3,  1,  1)   yes (all > 0)     Yes
    1,4   (-1, -2, -1)   yes (all < 0)     No
    1,5   ( 1, -3,  1)   no                Equal (8 = 8)
    2,3   ( 1,  2, -1)   no                Yes (3 > 2)
    4,5   ( 2, -1,  2)   no                Yes (13 > 8)

Gated, S = 2, pair 1,2: focus {1,3} -> (2, 2) dominated, scores 7 vs 1 (Yes); focus {1,2} -> (2, -1)
not dominated, scores 4 vs 3 (Yes); pair 1,5 focus {1,2} -> (1, -3), scores 4 vs 6 (No).
Prior (0.5, 0.5, 0.5): cos with w* = 4 / sqrt(18) = 0.9428.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE
from verl_selflock.envs import RoundKind, make_env, registered_envs
from verl_selflock.envs.pe.env import PreferenceEstimationEnv
from verl_selflock.envs.pe.geometry import cosine, is_dominated
from verl_selflock.envs.pe.prompts import FEEDBACK_PREFIX

MOVIES = [[3, 1, 2], [1, 2, 0], [0, 0, 1], [4, 3, 3], [2, 4, 1]]
W_STAR = [1.0, 1.0, 2.0]
PRIOR_COS = 4 / math.sqrt(18)


def spec(variant: str = "full", **overrides) -> dict:
    base = {"task": "pe", "variant": variant, "D": 3, "movies": MOVIES, "w_star": W_STAR, "max_turns": 10}
    if variant == "gated":
        base["S"] = 2
    base.update(overrides)
    return base


def env_of(variant: str = "full", **overrides) -> PreferenceEstimationEnv:
    env = make_env(spec(variant, **overrides))
    assert isinstance(env, PreferenceEstimationEnv)
    return env


def act(pair: str, focus: str | None = None) -> str:
    lines = ([f"Focus: {focus}"] if focus is not None else []) + [f"Pair: {pair}"]
    return "<scratch>thinking</scratch>\n<interact>\n" + "\n".join(lines) + "\n</interact>"


def guess(values: str) -> str:
    return f"<scratch>update</scratch><interact>Guess: {values}</interact>"


def answer(values: str) -> str:
    return f"<scratch>done</scratch><answer>{values}</answer>"


GOOD_GUESS = guess("1, 1, 2")  # cos 1.0 > prior
BAD_GUESS = guess("1, 0, 0")  # cos 1/sqrt(6) < prior


# --- registration, spec, schedule ------------------------------------------------------------------


def test_registered_and_built_from_spec():
    assert "pe" in registered_envs()
    env = env_of()
    assert env.task == "pe" and env.max_turns == 10 and env.n_movies == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"variant": "partial"},
        {"w_star": [1.0, -1.0, 0.0]},
        {"w_star": [0.0, 0.0, 0.0]},
        {"w_star": [1.0, 1.0]},
        {"movies": [[1, 2], [3, 4]]},
        {"max_turns": 7},
        {"movies": [[1, 2, float("nan")], [1, 2, 3]]},
    ],
)
def test_malformed_spec_raises_value_error(bad):
    with pytest.raises(ValueError):
        make_env(spec(**bad))


def test_gated_spec_needs_focus_size():
    bad = spec("gated")
    del bad["S"]
    with pytest.raises(ValueError):
        make_env(bad)


@pytest.mark.parametrize("variant,max_turns,actions,updates", [("gated", 10, 5, 4), ("full", 12, 6, 5)])
def test_round_schedule(variant, max_turns, actions, updates):
    env = env_of(variant, max_turns=max_turns)
    kinds = []
    pairs = [(i, j) for i in range(1, 6) for j in range(i + 1, 6)]
    for turn in range(1, max_turns + 1):
        kind = env.next_round()
        kinds.append(kind)
        if kind is RoundKind.ACTION:
            i, j = pairs[turn // 2]
            result = env.step_sync(act(f"{i},{j}", "1,2" if variant == "gated" else None))
            assert result.label.channel == CHANNEL_AS and not result.done
        elif kind is RoundKind.UPDATE:
            result = env.step_sync(GOOD_GUESS)
            assert result.label.channel == CHANNEL_BT and not result.done
        else:
            result = env.step_sync(answer("1,1,2"))
            assert result.done and result.observation is None
    assert kinds.count(RoundKind.ACTION) == actions and kinds.count(RoundKind.UPDATE) == updates
    assert kinds[-1] is RoundKind.ANSWER and kinds.count(RoundKind.ANSWER) == 1
    metrics = env.result().metrics
    assert metrics["action_rounds"] == actions and metrics["update_rounds"] == updates
    assert metrics["turns"] == max_turns


def test_max_turns_override():
    env = make_env(spec(), max_turns=4)
    assert env.step_sync(act("1,2")).observation is not None  # turn 1 action
    assert env.step_sync(GOOD_GUESS).observation is not None  # turn 2 update
    last = env.step_sync(act("2,3"))  # turn 3: last action, the feedback carries the final instruction
    assert "Answer round" in last.observation and "<answer> and </answer>" in last.observation
    assert env.step_sync(answer("1,1,2")).done


def test_async_step_api():
    env = env_of()
    result = asyncio.run(env.step(act("1,2")))
    assert result.info["feedback"] == "Yes."


# --- feedback --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair,word", [("1,2", "Yes."), ("2,1", "Yes."), ("1,4", "No."), ("1,5", "Equal."), ("2,3", "Yes.")]
)
def test_full_feedback(pair, word):
    result = env_of().step_sync(act(pair))
    assert result.info["feedback"] == word
    assert result.observation.startswith(FEEDBACK_PREFIX + word)
    assert "Update round" in result.observation


@pytest.mark.parametrize(
    "pair,focus,word",
    [
        ("1,2", "1,3", "Yes."),
        ("1,2", "1,2", "Yes."),
        ("1,5", "2,1", "No."),
        ("2,3", "1,3", "No."),  # 1*1 + 2*0 = 1 vs 1*0 + 2*1 = 2: uses w_3 = 2, not w_2
    ],
)
def test_gated_feedback_uses_focus_only(pair, focus, word):
    result = env_of("gated").step_sync(act(pair, focus))
    assert result.info["feedback"] == word


@pytest.mark.parametrize("pair,word", [("1,2", "Equal."), ("1,3", "Equal."), ("1,4", "No."), ("1,5", "Yes.")])
def test_equal_band_is_1e_12(pair, word):
    movies = [[1.0, 0.0], [1.0 + 1e-13, 0.0], [1.0 - 1e-13, 0.0], [1.0 + 1e-9, 0.0], [1.0 - 1e-9, 0.0]]
    env = make_env({"task": "pe", "variant": "full", "D": 2, "movies": movies, "w_star": [1.0, 0.0], "max_turns": 10})
    assert env.step_sync(act(pair)).info["feedback"] == word


@pytest.mark.parametrize("variant", ["gated", "full"])
def test_feedback_and_dominance_match_a_slow_reference(variant):
    """Random tables and queries against a plain-Python loop implementation of the same rules."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        movies = rng.integers(0, 6, size=(6, 4)).astype(float).tolist()  # small ints: ties and zeros happen
        w_star = rng.dirichlet(np.ones(4)).tolist()
        pe_spec = {"task": "pe", "variant": variant, "D": 4, "movies": movies, "w_star": w_star, "max_turns": 2}
        if variant == "gated":
            pe_spec["S"] = 2
        env = make_env(pe_spec)
        i, j = sorted(rng.choice(6, size=2, replace=False) + 1)
        focus = sorted(rng.choice(4, size=2, replace=False) + 1) if variant == "gated" else [1, 2, 3, 4]
        result = env.step_sync(act(f"{j},{i}", ",".join(map(str, focus)) if variant == "gated" else None))
        score_i = sum(w_star[k - 1] * movies[i - 1][k - 1] for k in focus)
        score_j = sum(w_star[k - 1] * movies[j - 1][k - 1] for k in focus)
        word = "Yes." if score_i > score_j + 1e-12 else "No." if score_j > score_i + 1e-12 else "Equal."
        diffs = [movies[i - 1][k - 1] - movies[j - 1][k - 1] for k in focus]
        dominated = all(d >= 1e-5 for d in diffs) or all(d <= -1e-5 for d in diffs)
        assert result.info["feedback"] == word, trial
        assert result.info["dominated"] is dominated and result.label.critique == (-1 if dominated else 1), trial


# --- AS critique -----------------------------------------------------------------------------------


def test_is_dominated_rule():
    assert is_dominated(np.array([3.0, 1.0, 1.0]))
    assert is_dominated(np.array([-1.0, -2.0, -1.0]))
    assert not is_dominated(np.array([2.0, -1.0, 2.0]))
    assert not is_dominated(np.array([1e-6, 1.0]))  # below the 1e-5 band: neither sign
    # An exact zero component counts neither way (verl_selflock/envs/pe/geometry.py).
    assert not is_dominated(np.array([-2.0, -4.0, 0.0]))


@pytest.mark.parametrize("pair,critique", [("1,2", 1), ("1,3", -1), ("1,4", -1), ("2,3", 1), ("4,5", 1)])
def test_full_as_dominance(pair, critique):
    result = env_of().step_sync(act(pair))
    assert result.label.critique == critique and result.label.channel == CHANNEL_AS
    assert result.info["dominated"] is (critique == -1)
    assert result.valid  # a dominated query is still a valid one, with real feedback
    assert result.info["feedback"] in ("Yes.", "No.")


@pytest.mark.parametrize("focus,critique", [("1,3", -1), ("1,2", 1), ("2,3", 1)])
def test_gated_as_dominance_restricted_to_focus(focus, critique):
    # Pair 1,2 is informative over all attributes; restricted to {1,3} it is dominated.
    assert env_of("gated").step_sync(act("1,2", focus)).label.critique == critique


def test_repeat_is_invalid_and_penalised_but_episode_continues():
    env = env_of("gated")
    assert env.step_sync(act("1,2", "1,2")).label.critique == 1
    env.step_sync(GOOD_GUESS)
    again = env.step_sync(act("2,1", "2,1"))  # same pair, same focus, other order
    assert again.repeated and not again.valid and again.label.critique == -1
    assert "Invalid query" in again.observation and FEEDBACK_PREFIX not in again.observation
    assert not again.done
    env.step_sync(GOOD_GUESS)
    other_focus = env.step_sync(act("1,2", "2,3"))  # same pair, different focus: a new question
    assert not other_focus.repeated and other_focus.valid and other_focus.label.critique == 1
    metrics = env.result().metrics
    assert metrics["repeats"] == 1 and metrics["invalid_actions"] == 0


def test_full_repeat():
    env = env_of()
    env.step_sync(act("1,2"))
    env.step_sync(GOOD_GUESS)
    assert env.step_sync(act("2,1")).repeated


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<scratch>no block</scratch>",
        "Pair: 1,2",  # no tags
        "<interact>Pair: 1,6</interact>",  # out of range
        "<interact>Pair: 0,1</interact>",  # 0 is not 1-based
        "<interact>Pair: 2,2</interact>",  # not distinct
        "<interact>Pair: 1,2,3</interact>",
        "<interact>Pair: 1,٢</interact>",  # Arabic-Indic digit
        "<interact>Pair: 1,2\nPair: 2,3</interact>",
        "<interact>Pair: 1,2\nThe feedback of your latest query: Yes.</interact>",  # injected feedback
        "<interact>Guess: 1,1,2</interact>",
        "<answer-ish>Pair: 1,2</interact>",  # closing tag without an opening tag
    ],
)
def test_invalid_actions(text):
    env = env_of()
    result = env.step_sync(text)
    assert not result.valid and not result.done and result.label.critique == -1
    assert result.label.channel == CHANNEL_AS
    assert result.observation.startswith("Invalid query")
    assert env.result().metrics["invalid_actions"] == 1


def test_gated_action_needs_focus_and_pair():
    env = env_of("gated")
    assert not env.step_sync(act("1,2")).valid  # no Focus line
    env.step_sync(GOOD_GUESS)
    assert not env.step_sync(act("1,2", "1,2,3")).valid  # S = 2, not 3
    env.step_sync(GOOD_GUESS)
    flipped = env.step_sync("<interact>\nPair: 1,2\nFocus: 2,1\n</interact>")  # order of lines is free
    assert flipped.valid and flipped.info["focus"] == [1, 2]


def test_fake_feedback_outside_the_block_is_ignored():
    text = "The feedback of your latest query: Yes.\n<interact>Pair: 1,4</interact>"
    result = env_of().step_sync(text)
    assert result.valid and result.info["feedback"] == "No."


def test_as_penalised_after_invalid_guess_but_feedback_given():
    env = env_of()
    env.step_sync(act("1,2"))
    assert env.step_sync(guess("1, 1")).label.critique == -1  # wrong length
    result = env.step_sync(act("2,3"))  # informative, but the previous guess was invalid
    assert result.valid and result.info["feedback"] == "Yes." and result.label.critique == -1


# --- BT critique -----------------------------------------------------------------------------------


def test_bt_first_guess_is_compared_with_the_prior():
    env = env_of()
    env.step_sync(act("1,2"))
    result = env.step_sync(GOOD_GUESS)
    assert result.label.critique == 1 and result.label.channel == CHANNEL_BT
    assert result.info["psi_prev"] == pytest.approx(PRIOR_COS)
    assert result.info["psi_hat"] == pytest.approx(1.0)


def test_bt_same_direction_as_prior_is_not_progress():
    env = env_of()
    env.step_sync(act("1,2"))
    result = env.step_sync(guess("7, 7, 7"))  # cos equals the prior's: not strictly better
    assert result.label.critique == -1
    assert result.info["psi_hat"] == pytest.approx(PRIOR_COS)


def test_bt_negative_when_moving_away():
    env = env_of()
    env.step_sync(act("1,2"))
    result = env.step_sync(BAD_GUESS)
    assert result.label.critique == -1
    assert result.info["psi_hat"] == pytest.approx(1 / math.sqrt(6))


@pytest.mark.parametrize(
    "first_action",
    [
        "<interact>Pair: 9,9</interact>",  # invalid action
        act("1,3"),  # dominated: AS -1
    ],
)
def test_bt_zero_after_bad_action(first_action):
    env = env_of()
    assert env.step_sync(first_action).label.critique == -1
    result = env.step_sync(GOOD_GUESS)
    assert result.label.critique == 0 and result.label.channel == CHANNEL_BT and result.valid


def test_bt_zero_after_repeat():
    env = env_of()
    env.step_sync(act("1,2"))
    env.step_sync(GOOD_GUESS)
    env.step_sync(act("1,2"))
    assert env.step_sync(BAD_GUESS).label.critique == 0


def test_bt_compares_with_previous_valid_guess_skipping_invalid_ones():
    env = env_of()
    env.step_sync(act("1,2"))
    env.step_sync(guess("1, 1, 1.5"))  # valid, cos = 0.9898
    env.step_sync(act("2,3"))
    env.step_sync(guess("nan, 1, 2"))  # invalid
    env.step_sync(act("4,5"))
    result = env.step_sync(guess("1, 1, 1.2"))  # better than the prior, worse than the first guess
    assert result.info["psi_prev"] == pytest.approx(cosine(np.array([1, 1, 1.5]), np.array(W_STAR)))
    # AS was -1 (previous guess invalid), so BT is 0 here; the next informative round judges it.
    assert result.label.critique == 0
    env.step_sync(act("1,5"))
    assert env.step_sync(guess("1, 1, 1.1")).label.critique == -1  # worse than (1, 1, 1.2)


@pytest.mark.parametrize(
    "values,reason",
    [
        ("1, 1", "exactly 3"),
        ("1, 1, 2, 3", "exactly 3"),
        ("nan, 1, 2", "finite"),
        ("inf, 1, 2", "finite"),
        ("1e999, 1, 2", "finite"),
        ("-1, 1, 2", "non-negative"),
        ("0, 0, 0", "direction"),
        ("١, 1, 2", "ASCII"),
        ("", "exactly 3"),
    ],
)
def test_invalid_guess(values, reason):
    env = env_of()
    env.step_sync(act("1,2"))
    result = env.step_sync(guess(values))
    assert not result.valid and result.label.critique == -1 and result.label.channel == CHANNEL_BT
    assert reason in result.info["error"]
    assert result.observation.startswith("Invalid estimate") and "Action round" in result.observation
    assert env.result().metrics["invalid_guesses"] == 1


def test_guess_with_huge_values_is_fine():
    env = env_of()
    env.step_sync(act("1,2"))
    result = env.step_sync(guess("1e300, 1e300, 2e300"))
    assert result.valid and result.info["psi_hat"] == pytest.approx(1.0)


# --- answer and outcome -----------------------------------------------------------------------------


def _d2_env(max_turns: int = 2) -> PreferenceEstimationEnv:
    # w* = (1, 0): cos of (1, t) is 1 / sqrt(1 + t^2); > 0.88 iff t < 0.5398.
    movies = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]
    return make_env(
        {"task": "pe", "variant": "full", "D": 2, "movies": movies, "w_star": [1.0, 0.0], "max_turns": max_turns}
    )


@pytest.mark.parametrize("values,reward", [("1, 0.53", 1.0), ("1, 0.55", 0.0), ("3, 0", 1.0), ("0, 1", 0.0)])
def test_outcome_threshold_both_sides(values, reward):
    env = _d2_env()
    env.step_sync(act("1,2"))
    result = env.step_sync(answer(values))
    assert result.done and result.label.critique == 0 and result.label.channel == CHANNEL_NONE
    outcome = env.result()
    assert outcome.reward == reward and outcome.success is (reward == 1.0) and outcome.answered
    a, t = (float(v) for v in values.split(","))
    assert result.info["answer_cos"] == pytest.approx(a / math.hypot(a, t))


@pytest.mark.parametrize("values", ["1", "1, 0, 0", "-1, 0", "0, 0", "nan, 0"])
def test_invalid_answer_scores_zero(values):
    env = _d2_env()
    env.step_sync(act("1,2"))
    result = env.step_sync(answer(values))
    assert result.done and not result.valid and result.label.critique == 0
    outcome = env.result()
    assert outcome.reward == 0.0 and not outcome.answered and outcome.metrics["answered"] == 0.0


def test_answer_turn_without_answer_tag_ends_unanswered():
    env = _d2_env()
    env.step_sync(act("1,2"))
    result = env.step_sync("<interact>Guess: 1, 0</interact>")
    assert result.done and result.label.critique == 0 and not env.result().answered


@pytest.mark.parametrize("turns_before", [0, 1])
def test_early_answer_ends_episode_with_label_zero(turns_before):
    env = env_of()
    if turns_before:
        env.step_sync(act("1,2"))  # then the early answer comes in an Update round
    result = env.step_sync(answer("2, 2, 4"))
    assert result.done and result.observation is None and result.info["early"]
    assert result.label.critique == 0 and result.label.channel == CHANNEL_NONE
    outcome = env.result()
    assert outcome.reward == 1.0 and outcome.answered and outcome.metrics["turns"] == turns_before + 1


def test_answer_inside_scratch_counts_first_closing_tag_decides():
    env = env_of()
    text = "<scratch>maybe <answer>1,1,2</answer> later</scratch><interact>Pair: 1,2</interact>"
    result = env.step_sync(text)
    assert result.done and env.result().reward == 1.0


def test_text_after_the_first_closing_tag_is_ignored():
    env = env_of()
    result = env.step_sync("<interact>Pair: 1,2</interact> and then <answer>1,1,2</answer>")
    assert not result.done and result.valid and result.info["feedback"] == "Yes."
    assert not env.result().answered


def test_reward_uses_the_given_answer_not_the_transcript():
    # The observation of the last action mentions the answer tags; only the agent's own block counts.
    env = _d2_env()
    obs = env.step_sync(act("1,2")).observation
    assert "<answer>" in obs
    env.step_sync("<scratch>I give up</scratch>")
    assert env.result().reward == 0.0 and not env.result().answered


def test_step_after_done_is_harmless():
    env = env_of()
    env.step_sync(answer("1,1,2"))
    before = env.result()
    result = env.step_sync(act("1,2"))
    assert result.done and result.observation is None and result.label.critique == 0
    assert env.result() == before


# --- observations and metrics -------------------------------------------------------------------------


def test_observations_tell_what_to_do_next():
    env = env_of("gated")
    after_action = env.step_sync(act("1,2", "1,2")).observation
    assert after_action.startswith("The feedback of your latest query: Yes.")
    assert "Round 2 of 10 is an Update round" in after_action and "Guess:" in after_action
    after_update = env.step_sync(GOOD_GUESS).observation
    assert "Round 3 of 10 is an Action round" in after_update and "Focus:" in after_update
    assert "4 queries left" in after_update


def test_metrics_of_a_scripted_episode():
    env = env_of("gated")
    script = [
        act("1,2", "1,2"),  # AS +1
        GOOD_GUESS,  # BT +1 (cos 1 > prior)
        act("1,2", "1,3"),  # AS -1 (dominated on the focus)
        BAD_GUESS,  # BT 0 (preceding AS -1)
        "<interact>Focus: 1,2</interact>",  # invalid action: AS -1
        guess("1,2"),  # invalid guess: BT -1
        act("1,2", "1,2"),  # repeat: AS -1
        guess("1, 1, 1.9"),  # BT 0 (after a repeat)
        act("1,5", "1,2"),  # informative, previous guess valid: AS +1
        answer("1, 1, 2.1"),
    ]
    labels = [env.step_sync(text).label.critique for text in script]
    assert labels == [1, 1, -1, 0, -1, -1, -1, 0, 1, 0]
    outcome = env.result()
    assert outcome.reward == 1.0 and outcome.answered
    expected = dict(turns=10, action_rounds=5, update_rounds=4, invalid_actions=1, invalid_guesses=1, repeats=1)
    expected.update(answered=1)
    for key, value in expected.items():
        assert outcome.metrics[key] == value, key
    # The environment labels turns; it does not count critiques (the episode runner does).
    assert not {"as_pos", "as_neg", "bt_pos", "bt_neg"} & set(outcome.metrics)
    assert outcome.metrics["psi_final"] == pytest.approx(cosine(np.array([1, 1, 1.9]), np.array(W_STAR)))
    assert all(isinstance(v, float) for v in outcome.metrics.values())


def test_psi_final_is_prior_without_valid_guess():
    env = env_of()
    assert env.result().metrics["psi_final"] == pytest.approx(PRIOR_COS)
