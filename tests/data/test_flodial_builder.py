"""FloDial builder: a hand-built flowchart written by the test in the official schema, and the real
FloDial knowledge sources at ``../shared/data/flodial`` when they are there (skipped otherwise)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from fixtures.flodial_charts import EDGES, FAULTS, QUESTIONS, SEPARATING, laptop_chart, write_charts

from verl_selflock.cli import main as cli_main
from verl_selflock.contracts.critique import CHANNEL_AS
from verl_selflock.data.flodial import FloDialDataConfig, build_flodial_rows
from verl_selflock.data.flodial_charts import load_flowchart, load_flowcharts, separating_questions
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.flodial.parsing import normalise_query
from verl_selflock.simulators import ChatReply

REAL_FLODIAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flodial"
needs_real_data = pytest.mark.skipif(
    not (REAL_FLODIAL / "knowledge-sources").is_dir(),
    reason=f"FloDial knowledge sources not found at {REAL_FLODIAL} (no licence: the project does not ship them)",
)


def test_paths_tables_and_separating_questions_of_a_hand_built_chart():
    chart = load_flowchart(laptop_chart())
    assert chart.paths == {
        "3": (("1", "no"),),
        "5": (("1", "yes"), ("2", "no")),
        "6": (("1", "yes"), ("2", "yes"), ("4", "yes")),
        "8": (("1", "yes"), ("2", "yes"), ("4", "no"), ("7", "yes")),
        "10": (("1", "yes"), ("2", "yes"), ("4", "no"), ("7", "no"), ("9", "yes")),
    }
    assert chart.table("8") == [
        {"node": "1", "question": "Does the laptop power on?", "answer": "yes"},
        {"node": "2", "question": "Is the screen black?", "answer": "yes"},
        {"node": "4", "question": "Does an external monitor show a picture?", "answer": "no"},
        {"node": "7", "question": "Does the fan spin?", "answer": "yes"},
    ]
    for fault, expected in SEPARATING.items():
        others = [f for f in FAULTS if f != fault]
        assert separating_questions(chart, fault, others) == expected
    assert separating_questions(chart, "8", ["6", "10"]) == 2  # split at nodes 4 and 7
    assert separating_questions(chart, "10", ["8"]) == 1


@pytest.mark.parametrize(
    "difficulty, n_candidates, faults, n_rows",
    # With all 5 faults as candidates there is one episode per true fault (up to candidate order).
    [
        ("easy", 5, {"3", "5"}, 2),
        ("hard", 5, {"6", "8", "10"}, 3),
        ("easy", 3, set(FAULTS), 20),
        ("hard", 4, {"6", "8", "10"}, 6),
    ],
)
def test_difficulty_decides_which_faults_and_sets_are_drawn(difficulty, n_candidates, faults, n_rows):
    charts = {"laptop_screen": load_flowchart(laptop_chart())}
    config = FloDialDataConfig(difficulty=difficulty, n_candidates=n_candidates)
    rows = build_flodial_rows(charts, config, n_train=n_rows, n_test=0, seed=3, progress=False)["train"]
    specs = [row["extra_info"]["env"] for row in rows]
    drawn = {spec["candidate_nodes"][spec["answer_index"]] for spec in specs}
    assert drawn <= faults and len(drawn) >= 2 and len(specs) == n_rows
    for spec in specs:
        k = spec["separating_questions"]
        assert (k <= 2) if difficulty == "easy" else (k >= 3)
        assert len(spec["candidates"]) == n_candidates == len(set(spec["candidate_nodes"]))


def test_hard_needs_four_candidates_and_small_charts_give_all_their_faults():
    with pytest.raises(ValueError, match="hard episodes need >= 4 candidates"):
        FloDialDataConfig(difficulty="hard", n_candidates=3)
    charts = {"laptop_screen": load_flowchart(laptop_chart())}
    rows = build_flodial_rows(charts, FloDialDataConfig(n_candidates=8), 2, 0, seed=0, progress=False)["train"]
    assert all(sorted(r["extra_info"]["env"]["candidate_nodes"]) == sorted(FAULTS) for r in rows)
    with pytest.raises(ValueError, match="could not draw 3 distinct"):
        # Only two easy episodes exist with all five faults as candidates (true fault 3 or 5).
        build_flodial_rows(charts, FloDialDataConfig(n_candidates=5), 3, 0, seed=0, progress=False)


def test_faults_with_the_same_text_never_share_a_candidate_set():
    chart = load_flowchart(laptop_chart(faults={"10": FAULTS["6"]}))  # 6 and 10 give the same fix
    rows = build_flodial_rows({"c": chart}, FloDialDataConfig(n_candidates=5), 4, 0, seed=1, progress=False)["train"]
    for row in rows:
        texts = row["extra_info"]["env"]["candidates"]
        assert len(texts) == len(set(texts)) == 4  # four distinct fixes in the chart


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c["edges"].update({"9": {"yes": "99"}}), "points to no node"),
        (lambda c: c["edges"].update({"9": {"yes": "2"}}), "reached twice"),
        (lambda c: c["edges"].update({"9": {"maybe": "10"}}), "only 'yes'/'no'"),
        (lambda c: c["edges"].pop("9"), "has no outgoing edge"),
        (lambda c: c["nodes"].pop("1"), "no root node"),
        (lambda c: c["nodes"].update({"11": {"utterance": "Orphan fix.", "terminal": True}}), "not reachable"),
    ],
)
def test_malformed_charts_are_rejected_by_name(mutate, error):
    chart = json.loads(json.dumps(laptop_chart()))
    mutate(chart)
    with pytest.raises(ValueError, match=f"flowchart 'laptop_screen': .*{error}"):
        load_flowchart(chart)


def build_with_cli(tmp_path: Path, source: Path, *args: str) -> dict[str, pd.DataFrame]:
    out = tmp_path / "out"
    code = cli_main(["data", "flodial", "--input", str(source), "--out", str(out), "--no-progress", *args])
    assert code == 0
    return {split: pd.read_parquet(out / f"{split}.parquet") for split in ("train", "test")}


class TableSimulator:
    """Answers from the episode's own table by exact question text (a perfect user): lets a row read
    back from parquet run through the environment."""

    def __init__(self, table) -> None:
        self.rows = {normalise_query(row["question"]): (i, row["answer"]) for i, row in enumerate(table)}

    async def chat(self, messages, **_: object) -> ChatReply:
        hit = self.rows.get(normalise_query(messages[-1]["content"]))
        return ChatReply(f"{hit[1].capitalize()}, {hit[0]}" if hit else "Unknown", ok=True)


def play_table(spec) -> tuple[list[int], float]:
    """Ask the table's questions in order with uniform guesses, answer with the truth."""
    env = make_env(spec, context=EnvContext(simulator=TableSimulator(spec["table"])))
    K, gt = len(spec["candidates"]), int(spec["answer_index"])
    script = []
    for row in list(spec["table"])[: spec["max_turns"] // 2]:
        uniform = ",".join(["1"] * K)
        script += [f"<interact>Query: {row['question']}</interact>", f"<interact>Guess: {uniform}</interact>"]
    script = script[: spec["max_turns"] - 1]
    script.append("<answer>" + ",".join("1" if i == gt else "0" for i in range(K)) + "</answer>")

    async def main():
        return [await env.step(text) for text in script]

    steps = asyncio.run(main())
    return [s.label.critique for s in steps if s.label.channel == CHANNEL_AS], env.result().reward


def test_cli_builds_reproducible_rows_on_fixture_charts(tmp_path):
    source = write_charts(tmp_path / "flodial", [laptop_chart(), laptop_chart("laptop_screen_b")])
    args = ("--difficulty", "easy", "--n-candidates", "3", "--train", "12", "--test", "5", "--seed", "7")
    frames = build_with_cli(tmp_path / "a", source.parent, *args)  # the folder that holds knowledge-sources
    again = build_with_cli(tmp_path / "b", source, *args)
    for split in ("train", "test"):
        pd.testing.assert_frame_equal(frames[split], again[split])
    train, test = frames["train"], frames["test"]
    assert (len(train), len(test)) == (12, 5)
    assert set(train.agent_name) == {"active_reasoning"} and set(train.data_source) == {"flodial_easy"}

    def key(spec):
        return spec["chart"], spec["candidate_nodes"][spec["answer_index"]], tuple(sorted(spec["candidate_nodes"]))

    train_keys = [key(r["env"]) for r in train.extra_info]
    test_keys = [key(r["env"]) for r in test.extra_info]
    assert len(set(train_keys)) == 12 and not set(train_keys) & set(test_keys)

    for frame, split in ((train, "train"), (test, "test")):
        for row in frame.itertuples():
            spec = row.extra_info["env"]
            assert spec["split"] == split == row.extra_info["split"] and spec["task"] == "flodial"
            assert json.loads(row.reward_model["ground_truth"]) == spec["answer_index"]
            prompt = " ".join(m["content"] for m in row.prompt)
            # The candidates are shown, the table (the true fault's path) never is.
            assert all(text in prompt for text in spec["candidates"])
            assert not any(q in prompt for q in QUESTIONS.values())
            # The table's answers lead from the root to the true fault.
            node = "1"
            for table_row in spec["table"]:
                assert table_row["node"] == node
                node = EDGES[node][table_row["answer"]]
            assert node == spec["candidate_nodes"][spec["answer_index"]]

    # A row read back from parquet runs in the environment: a perfect player is rewarded.
    labels, reward = play_table(train.extra_info[0]["env"])
    assert reward == 1.0 and all(z in (0, 1) for z in labels)


def test_rows_survive_verls_dataset_and_play(tmp_path, monkeypatch, smollm2_dir):
    """veRL's RLHFDataset reads the parquet (nothing filtered as overlong at veRL's default 1024 prompt
    tokens) and hands back a spec the environment plays to the end."""
    datasets = pytest.importorskip("datasets")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    source = write_charts(tmp_path, [laptop_chart()])
    build_with_cli(tmp_path, source, "--n-candidates", "3", "--train", "3", "--test", "1")
    config = OmegaConf.create(
        {
            "max_prompt_length": 1024,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "verl_cache"),
        }
    )
    dataset = RLHFDataset(str(tmp_path / "out" / "train.parquet"), AutoTokenizer.from_pretrained(smollm2_dir), config)
    assert len(dataset) == 3
    for index in range(3):
        item = dataset[index]
        assert item["agent_name"] == "active_reasoning" and item["data_source"] == "flodial_easy"
        labels, reward = play_table(item["extra_info"]["env"])
        assert reward == 1.0 and -1 not in labels


def test_u_flo_holds_out_the_test_charts(tmp_path):
    source = write_charts(tmp_path, [laptop_chart("alpha"), laptop_chart("beta"), laptop_chart("gamma")])
    frames = build_with_cli(
        tmp_path, source, "--split-scheme", "u-flo", "--test-charts", "beta", "--n-candidates", "3",
        "--train", "10", "--test", "4",
    )
    assert {r["env"]["chart"] for r in frames["test"].extra_info} == {"beta"}
    assert {r["env"]["chart"] for r in frames["train"].extra_info} <= {"alpha", "gamma"}


def test_u_flo_with_test_charts_the_input_lacks_is_one_line(tmp_path, capsys):
    source = write_charts(tmp_path, [laptop_chart("alpha"), laptop_chart("beta")])
    code = cli_main(["data", "flodial", "--input", str(source), "--out", str(tmp_path / "x"), "--split-scheme", "u-flo"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "--test-charts ['car_steering', 'laptop_battery'] are not among the flowcharts ['alpha', 'beta']" in error
    assert not (tmp_path / "x").exists()  # refused before anything was written


# --------------------------------------------------------------------------- the real FloDial files


@needs_real_data
def test_real_flowcharts_load_and_match_the_published_counts():
    charts = load_flowcharts(REAL_FLODIAL)
    assert len(charts) == 12
    assert sum(len(c.faults) for c in charts.values()) == 183
    assert sum(len(c.faults) + len(c.questions) for c in charts.values()) == 359
    depths = [max(len(p) for p in c.paths.values()) for c in charts.values()]
    assert (min(depths), max(depths)) == (5, 10)


@needs_real_data
@pytest.mark.parametrize("difficulty, scheme", [("easy", "s-flo"), ("hard", "u-flo")])
def test_real_flowcharts_build(tmp_path, difficulty, scheme):
    frames = build_with_cli(
        tmp_path, REAL_FLODIAL, "--difficulty", difficulty, "--split-scheme", scheme, "--train", "60", "--test", "30"
    )
    specs = {split: [r["env"] for r in frame.extra_info] for split, frame in frames.items()}
    for spec in specs["train"] + specs["test"]:
        assert len(spec["candidates"]) == 5 and len(set(spec["candidates"])) == 5
        assert (spec["separating_questions"] <= 2) == (difficulty == "easy")
        assert 1 <= len(spec["table"]) <= 10
    test_charts = Counter(spec["chart"] for spec in specs["test"])
    if scheme == "u-flo":
        assert set(test_charts) <= {"car_steering", "laptop_battery"}
        assert not {"car_steering", "laptop_battery"} & {spec["chart"] for spec in specs["train"]}
    labels, reward = play_table(specs["test"][0])
    assert reward == 1.0 and -1 not in labels
