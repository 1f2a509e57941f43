"""The FloDial expert: every turn replays through a fresh environment with the scripted exact-text user, the
critiques are the ones its rules predict, it never reads the truth, and its success rate on the real charts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fixtures.flodial_charts import FAULTS, QUESTIONS, SEPARATING, laptop_chart

from verl_selflock.data.flodial import FloDialDataConfig, build_flodial_rows, make_flodial_spec
from verl_selflock.data.flodial_charts import load_flowchart, load_flowcharts
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.demonstration import Demonstration
from verl_selflock.envs.flodial.expert import FloDialExpert, play_flodial_expert
from verl_selflock.envs.flodial.scripted_user import ScriptedFloDialUser
from verl_selflock.envs.parsing import cut_after_first_closing_tag
from verl_selflock.simulators import ChatReply

REAL_FLODIAL = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "flodial"
needs_real_data = pytest.mark.skipif(
    not (REAL_FLODIAL / "knowledge-sources").is_dir(),
    reason=f"FloDial knowledge sources not found at {REAL_FLODIAL} (no licence: the project does not ship them)",
)
CHART = load_flowchart(laptop_chart())
ALL_FAULTS = sorted(FAULTS, key=int)  # 3, 5, 6, 8, 10


def laptop_spec(fault: str, nodes=tuple(ALL_FAULTS), max_turns: int = 10, bt_variant: str = "v1") -> dict:
    """All five terminals as candidates, shown in the order ``nodes``; ``fault`` is the true one."""
    base = [fault, *(t for t in ALL_FAULTS if t != fault)]
    config = FloDialDataConfig(difficulty="hard", max_turns=max_turns, bt_variant=bt_variant)
    order = [base.index(node) for node in nodes]
    return make_flodial_spec(config, CHART, fault, base[1:], order, split="train", seed=0, instance_id="t")


def replay(demo: Demonstration, simulator=None) -> None:
    """Play the demonstration's texts through a fresh environment and check every turn against the rules."""
    spec = demo.spec
    env = make_env(spec, context=EnvContext(simulator=simulator or ScriptedFloDialUser(spec["table"]), training=False))
    queries = 0
    for number, turn in enumerate(demo.turns, start=1):
        cut, tag = cut_after_first_closing_tag(turn.text)
        last = number == len(demo.turns)
        assert cut == turn.text and tag == ("answer" if last else "interact"), turn.text
        assert turn.text.startswith("<scratch>") and turn.text.count("</scratch>") == 1
        assert turn.round == env.next_round().value
        step = asyncio.run(env.step(turn.text))
        assert step.valid and not step.repeated, step.info
        assert step.observation == turn.observation and int(step.label.critique) == turn.critique
        if last:
            assert step.done and turn.critique == 0
        elif turn.round == "action":
            queries += 1
            assert step.info["new_information"] and turn.critique == (1 if step.info["feedback"] == "yes" else 0)
            assert step.info["info_gain"] >= 1  # the split node's answer rules out at least one distractor
        else:
            assert turn.round == "update" and turn.critique == 1  # psi rises after every yes/no
    result = env.result()
    assert result.success == demo.success and result.reward == demo.reward and result.answered
    if demo.success and len(demo.turns) < spec["max_turns"]:  # answered early: every distractor was ruled out
        assert queries == spec["separating_questions"]


@pytest.mark.parametrize("fault", ALL_FAULTS)
@pytest.mark.parametrize("nodes", [tuple(ALL_FAULTS), ("8", "5", "10", "3", "6")])
def test_every_turn_replays_and_the_expert_wins(fault, nodes):
    spec = laptop_spec(fault, nodes)
    demo = play_flodial_expert(spec, seed=1)
    replay(demo)
    assert demo.success and demo.reward == 1.0
    # k separating questions, k beliefs, then the answer (early: k <= 4 < 5 Action rounds).
    assert len(demo.turns) == 2 * SEPARATING[fault] + 1
    assert [t.round for t in demo.turns][-1] == "action" and "<answer>" in demo.turns[-1].text
    asked = [t.text.split("Query: ")[1].split("\n")[0] for t in demo.turns if "Query: " in t.text]
    assert asked and asked[0] == QUESTIONS["1"] and set(asked) <= set(QUESTIONS.values())


def test_turn_texts_by_hand():
    demo = play_flodial_expert(laptop_spec("6", ("6", "3", "5", "8", "10")))
    texts = [t.text for t in demo.turns]
    assert texts[0] == (
        "<scratch>All 5 faults are possible; their troubleshooting paths part at this question.</scratch>\n"
        "<interact>\nQuery: Does the laptop power on?\n</interact>"
    )
    assert texts[1].endswith("<interact>Guess: 0.25,0,0.25,0.25,0.25</interact>")  # yes: fault 3 ruled out
    assert texts[2].endswith("<interact>\nQuery: Is the screen black?\n</interact>")
    assert texts[3].endswith("<interact>Guess: 0.333,0,0,0.333,0.333</interact>")
    assert texts[5].endswith("<interact>Guess: 1,0,0,0,0</interact>")
    assert texts[6] == "<scratch>Only fault 1 fits every answer: it is the cause.</scratch>\n<answer>1,0,0,0,0</answer>"


def test_the_expert_never_reads_the_truth():
    """Same candidates in the same order: the same questions whichever is true, as long as the answers are the
    same; flipping the table's answers changes nothing before a reply (only the wording of its nodes is read)."""
    nodes = ("8", "5", "10", "3", "6")
    firsts = set()
    for fault in ALL_FAULTS:
        spec = laptop_spec(fault, nodes)
        flipped = {**spec, "table": [{**r, "answer": "no" if r["answer"] == "yes" else "yes"} for r in spec["table"]]}
        assert FloDialExpert(spec).action() == FloDialExpert(flipped).action()
        firsts.add(FloDialExpert(spec, seed=5).action())
    assert len(firsts) == 1
    # 8 and 10 share the answers to nodes 1, 2, 4 (yes, yes, no): the first three questions are the same.
    eight, ten = (play_flodial_expert(laptop_spec(f, nodes)) for f in ("8", "10"))
    assert [t.text for t in eight.turns[:5]] == [t.text for t in ten.turns[:5]]


def test_deterministic_and_seeded():
    spec = laptop_spec("10", ("5", "3", "10", "6", "8"), max_turns=4)
    first, again = play_flodial_expert(spec, seed=3), play_flodial_expert(spec, seed=3)
    assert [t.text for t in first.turns] == [t.text for t in again.turns] and first.seed == 3


def test_budget_runs_out_then_a_seeded_guess():
    """Fault 10 needs 4 questions; 4 turns allow 2: the answer round guesses among the 3 alive candidates."""
    picks, wins = set(), 0
    for seed in range(12):
        demo = play_flodial_expert(laptop_spec("10", max_turns=4), seed=seed)
        replay(demo)
        assert [t.round for t in demo.turns] == ["action", "update", "action", "answer"]
        picks.add(demo.turns[-1].text.split("<answer>")[1].removesuffix("</answer>"))
        wins += demo.success
    assert picks == {"0,0,1,0,0", "0,0,0,1,0", "0,0,0,0,1"}  # faults 6, 8, 10 by seed
    assert 0 < wins < 12


class UnknownUser:
    """A simulator that never recognises a question (what a real LLM might do)."""

    async def chat(self, messages, **_: object) -> ChatReply:
        return ChatReply("Unknown", ok=True)


@pytest.mark.parametrize("bt_variant,update_critique", [("v1", 1), ("v0", 0)])
def test_an_unanswered_split_question_ends_in_a_guess(bt_variant, update_critique):
    spec = laptop_spec("8", bt_variant=bt_variant)
    demo = play_flodial_expert(spec, seed=0, simulator=UnknownUser())
    assert [t.round for t in demo.turns] == ["action", "update", "action"]  # asked once, never repeated
    assert [t.critique for t in demo.turns] == [-1, update_critique, 0]
    assert "Guess: 0.2,0.2,0.2,0.2,0.2" in demo.turns[1].text and all(t.valid for t in demo.turns)


def test_scripted_user_answers_exact_text_only():
    table = laptop_spec("8")["table"]
    user = ScriptedFloDialUser(table)
    assert user.reply_to("Does the laptop power on?") == "Yes, 0"
    assert user.reply_to("  does the LAPTOP power   on ") == "Yes, 0"  # normalised like the env's repeat check
    assert user.reply_to("Does an external monitor show a picture?") == "No, 2"
    assert user.reply_to("Is the laptop switched on?") == "Unknown"  # no paraphrase is recognised
    assert user.reply_to("Is the laptop under warranty?") == "Unknown"  # not on fault 8's path
    reply = asyncio.run(user.chat([{"role": "user", "content": "Does the fan spin?"}], cache_key="k"))
    again = asyncio.run(user.chat([{"role": "user", "content": "Does the fan spin?"}], cache_key="k"))
    assert (reply.text, reply.ok, reply.cached, again.cached, user.calls) == ("Yes, 3", True, False, True, 2)
    with pytest.raises(ValueError, match="not 'yes' or 'no'"):
        ScriptedFloDialUser([{"question": "q", "answer": "maybe"}])


@pytest.mark.parametrize(
    "change,seed,message",
    [
        ({"task": "pe"}, 0, "FloDial specs"),
        ({"candidate_paths": None}, 0, "candidate_paths"),
        ({"candidate_paths": [["1:yes"]]}, 0, "candidate_paths"),
        ({}, -1, "seed"),
        ({}, True, "seed"),
    ],
)
def test_bad_inputs(change, seed, message):
    with pytest.raises(ValueError, match=message):
        play_flodial_expert({**laptop_spec("5"), **change}, seed=seed)


def test_an_inconsistent_spec_is_refused():
    spec = laptop_spec("5")
    with pytest.raises(ValueError, match="not in the table"):
        FloDialExpert({**spec, "table": spec["table"][1:]}).action()
    prefix = [["1:yes"], ["1:yes", "2:no"], *spec["candidate_paths"][2:]]
    with pytest.raises(ValueError, match="distinct terminals"):
        FloDialExpert({**spec, "candidate_paths": prefix}).split_node()


# --------------------------------------------------------------------------- the real FloDial charts


@needs_real_data
@pytest.mark.parametrize("difficulty", ["easy", "hard"])
@pytest.mark.parametrize("scheme", ["s-flo", "u-flo"])
@pytest.mark.parametrize("max_turns,floor", [(10, 1.0), (6, 0.8)])
def test_success_rate_on_the_real_charts(difficulty, scheme, max_turns, floor):
    """Measured on 300 train episodes (seed 0) of each setting: 100% at the default 10 turns (K = 5 needs at
    most 4 questions); with 6 turns (2 questions, then a guess) Easy 100%, Hard 89% (s-flo) / 90% (u-flo)."""
    config = FloDialDataConfig(difficulty=difficulty, split_scheme=scheme, max_turns=max_turns)
    rows = build_flodial_rows(load_flowcharts(REAL_FLODIAL), config, 300, 0, 0, progress=False)["train"]
    demos = [play_flodial_expert(row["extra_info"]["env"], seed=0) for row in rows]
    rate = sum(d.success for d in demos) / len(demos)
    assert rate >= (1.0 if difficulty == "easy" else floor), rate
    for demo in demos[:40]:
        replay(demo)
