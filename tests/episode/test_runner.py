"""The episode runner on real environments: steps, counts, stop reasons and the result, without veRL.

PE cases use the hand table of ``tests/envs/pe/test_pe_env.py`` (full variant, D = 3, w* = (1, 1, 2)):
pair 1,2 is informative (AS +1), pair 1,3 is dominated (AS -1); the guess (1, 1, 2) has cos 1 with w*
(the prior's cos is 4 / sqrt(18)), the guess (1, 2, 0) has cos 3 / sqrt(30).
"""

from __future__ import annotations

import asyncio
import math
import sys

import pytest
from fixtures.scripted_env import TASK, ScriptedEnv

from verl_selflock.algorithms.t3 import T3Config
from verl_selflock.contracts import episode as ef
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.parsing import cut_after_first_closing_tag
from verl_selflock.episode.runner import EpisodeRunner

MOVIES = [[3, 1, 2], [1, 2, 0], [0, 0, 1], [4, 3, 3], [2, 4, 1]]
W_STAR = [1.0, 1.0, 2.0]
PRIOR_COS = 4 / math.sqrt(18)


def pe_env(max_turns: int = 10, training: bool = True):
    spec = {"task": "pe", "variant": "full", "D": 3, "movies": MOVIES, "w_star": W_STAR, "max_turns": max_turns}
    return make_env(spec, context=EnvContext(training=training))


def act(pair: str) -> str:
    return f"<scratch>thinking</scratch>\n<interact>\nPair: {pair}\n</interact>"


def guess(values: str) -> str:
    return f"<scratch>update</scratch><interact>Guess: {values}</interact>"


def answer(values: str) -> str:
    return f"<scratch>done</scratch><answer>{values}</answer>"


def play(runner: EpisodeRunner, texts: list[str]) -> list:
    """Judge ``texts`` in order as a player does (cut after the first closing tag; show each observation)
    until the runner stops the episode; the judgements."""

    async def main():
        judgements = []
        for text in texts:
            cut, tag = cut_after_first_closing_tag(text, runner.env.closing_tags)
            judgement = await runner.judge(cut, tag)
            judgements.append(judgement)
            if judgement.stop is not None:
                break
            runner.observation_shown()
        return judgements

    return asyncio.run(main())


def counts(stats: ef.EpisodeStats) -> dict:
    names = ("turns", "judged_turns", "action_rounds", "update_rounds", "as_pos", "as_neg", "bt_pos", "bt_neg")
    return {name: getattr(stats, name) for name in names}


def test_pe_episode_counts_stops_on_answer_and_scores():
    """Action +1, Update +1 (cos 1 > prior), Action -1 (dominated), Update 0 (after an AS -1), answer."""
    runner = EpisodeRunner(pe_env())
    judgements = play(runner, [act("1,2"), guess("1,1,2"), act("1,3"), guess("1,2,0"), answer("1,1,2"), act("2,3")])
    assert [j.kind for j in judgements] == ["action", "update", "action", "update", "answer"]
    assert [j.stop for j in judgements] == [None, None, None, None, ef.STOP_ANSWER]
    assert all(j.step_s >= 0.0 for j in judgements)
    stats = runner.finish()
    assert counts(stats) == {
        "turns": 5, "judged_turns": 5, "action_rounds": 2, "update_rounds": 2,
        "as_pos": 1, "as_neg": 1, "bt_pos": 1, "bt_neg": 0,
    }
    assert (stats.invalid_actions, stats.repeated_actions, stats.obs_truncated) == (0, 0, 0)
    assert stats.info_gain_count == 2 and stats.info_gain_sum > 0
    # Psi_hat per Update round: prior -> 1 -> 3/sqrt(30); the answer's cos is not an update.
    assert stats.psi_delta_count == 2
    assert stats.psi_delta_sum == pytest.approx(3 / math.sqrt(30) - PRIOR_COS)
    assert stats.stop_reason == ef.STOP_ANSWER and not stats.truncated
    assert (stats.reward, stats.success, stats.answered) == (1.0, True, True)
    assert stats.env_metrics["turns"] == 5.0 and stats.task == "pe" and stats.t3_enabled is False
    assert runner.observations == 4


def test_an_early_answer_is_the_answer_turn_and_a_wrong_one_scores_zero():
    runner = EpisodeRunner(pe_env())
    judgements = play(runner, [act("1,2"), answer("0,0,1")])
    assert [(j.kind, j.stop) for j in judgements] == [("action", None), ("answer", ef.STOP_ANSWER)]
    stats = runner.finish()
    assert (stats.action_rounds, stats.update_rounds, stats.judged_turns) == (1, 0, 2)
    assert stats.answered and stats.reward == 0.0 and not stats.success


def test_turn_cap_stops_with_max_turns_and_no_answer():
    runner = EpisodeRunner(pe_env(), turn_cap=3)
    judgements = play(runner, [act("1,2"), guess("1,1,2"), act("2,3"), guess("1,1,1")])
    assert [j.stop for j in judgements] == [None, None, ef.STOP_MAX_TURNS]
    assert runner.turns_left == 0
    stats = runner.finish()
    assert stats.stop_reason == ef.STOP_MAX_TURNS and stats.turns == 3
    assert (stats.reward, stats.answered) == (0.0, False)


def test_cap_on_observations_stops_with_max_turns():
    """veRL's ``max_user_turns``: after one observation shown, the next judged turn ends the episode."""
    runner = EpisodeRunner(pe_env(), max_observations=1)
    judgements = play(runner, [act("1,2"), guess("1,1,2"), act("2,3")])
    assert [j.stop for j in judgements] == [None, ef.STOP_MAX_TURNS]
    assert runner.observations == 1


def test_environment_done_and_missing_observation_stop_with_done():
    # The scripted env ends the episode at its answer turn without an answer: done, not answered.
    env = make_env({"task": TASK, "max_turns": 2, "answer": "1,2"})
    runner = EpisodeRunner(env)
    judgements = play(runner, ["<interact>a</interact>", "no answer here"])
    assert [j.stop for j in judgements] == [None, ef.STOP_DONE]
    assert runner.finish().answered is False
    # An empty observation ends the episode too (nothing to show the agent).
    env = make_env({"task": TASK, "max_turns": 6, "answer": "1,2", "observations": ["Fine.", ""]})
    runner = EpisodeRunner(env)
    judgements = play(runner, ["<interact>a</interact>", "<interact>b</interact>", "<interact>c</interact>"])
    assert [j.stop for j in judgements] == [None, ef.STOP_DONE]
    assert isinstance(env, ScriptedEnv) and env.received == ["<interact>a</interact>", "<interact>b</interact>"]


def test_t3_stops_training_rows_only():
    """Scripted progress 0, 0 with window k = 2: T3 ends a training episode after turn 2; an evaluation
    row (``training=False``) is not watched and plays on."""
    spec = {"task": TASK, "max_turns": 6, "answer": "1,2", "progress": [0.0, 0.0, 0.0]}
    t3 = T3Config(enabled=True, k=2)
    texts = ["<interact>a</interact>", "<interact>b</interact>", "<interact>c</interact>", "<answer>1,2</answer>"]

    runner = EpisodeRunner(make_env(spec, context=EnvContext(training=True)), t3=t3)
    assert runner.stats.t3_enabled
    judgements = play(runner, texts)
    assert [j.stop for j in judgements] == [None, ef.STOP_T3]
    stats = runner.finish()
    assert (stats.t3_truncated, stats.t3_turn, stats.stop_reason) == (True, 2, ef.STOP_T3)
    assert runner.turns_left == 4 and stats.answered is False

    runner = EpisodeRunner(make_env(spec, context=EnvContext(training=False)), t3=t3)
    assert not runner.stats.t3_enabled
    assert [j.stop for j in play(runner, texts)] == [None, None, None, ef.STOP_ANSWER]
    assert runner.finish().reward == 1.0


def test_stop_for_budget_counts_an_unjudged_turn():
    runner = EpisodeRunner(pe_env())
    play(runner, [act("1,2")])
    runner.observation_shown(capped=True)
    runner.stop_for_budget(unjudged_turn=True)
    stats = runner.finish()
    assert (stats.turns, stats.judged_turns, stats.obs_truncated) == (2, 1, 1)
    assert stats.truncated and stats.stop_reason == ef.STOP_RESPONSE_LENGTH
    assert stats.answered is False


def test_runner_imports_neither_verl_nor_torch():
    import subprocess

    code = (
        "import sys; import verl_selflock.episode.runner, verl_selflock.episode.counting; "
        "bad = [m for m in ('verl', 'torch', 'ray') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
