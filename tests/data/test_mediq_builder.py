"""MediQ data builder: fixture files in the official schema (written here), the CLI, the real MediQ
files when ``../shared/data/mediq`` is present, and an episode built from a parquet row."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from fixtures.mediq_rows import official_row

from verl_selflock.cli import main as cli_main
from verl_selflock.data import mediq as mediq_data
from verl_selflock.data.mediq import MediQDataError, build_mediq_dataset, download_official, read_cases
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.simulators import ChatReply

# ../shared/data/mediq relative to the project root (not imported from conftest: that name is ambiguous).
REAL_MEDIQ = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mediq"


def write_fixture(folder: Path) -> Path:
    """Two files: 10 good rows, Python-literal fields, ``atomic_facts``, and 2 unusable rows."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [official_row(i, answer="ABCD"[i % 4]) for i in range(8)]
    literal = official_row(8)
    literal["options"] = repr(literal["options"])  # a Python-literal string, as some MediQ dumps have
    literal["context"] = repr(literal["context"])
    atomic = official_row(9)
    atomic["atomic_facts"] = repr([f"Atomic fact {k} of case 9." for k in range(1, 5)])
    del atomic["facts"]
    no_facts = official_row(10, facts=[], context=[])
    bad_options = official_row(11, options={"A": "x", "B": "y", "C": "z"})
    (folder / "part_a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + [no_facts]))
    (folder / "part_b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (literal, atomic, bad_options)))
    return folder


def test_fixture_files_build_a_seeded_split(tmp_path):
    data = write_fixture(tmp_path / "raw")
    paths, skipped = build_mediq_dataset([data], tmp_path / "out", seed=3, n_val=3, progress=False)
    assert dict(skipped) == {"no_facts": 1, "malformed": 1}
    train, test = pd.read_parquet(paths["train"]), pd.read_parquet(paths["test"])
    assert (len(train), len(test)) == (7, 3)
    ids = [row["extra_info"]["env"]["id"] for _, row in pd.concat([train, test]).iterrows()]
    assert sorted(ids) == sorted([f"part_a-{i}" for i in range(8)] + ["part_b-8", "part_b-9"])

    for split, frame in (("train", train), ("test", test)):
        for index, row in frame.iterrows():
            spec = row["extra_info"]["env"]
            assert row["agent_name"] == "active_reasoning" and row["data_source"] == "mediq"
            assert row["extra_info"]["split"] == spec["split"] == split and row["extra_info"]["index"] == index
            assert spec["task"] == "mediq" and spec["max_turns"] == 8 and bool(spec["counterfactual_bt"])
            assert row["reward_model"]["ground_truth"] == "ABCD"[spec["answer_index"]]
            prompt = "\n".join(m["content"] for m in row["prompt"])
            assert spec["initial"] in prompt and all(option in prompt for option in spec["options"])
            # Hidden facts (and the answer) never reach the prompt; numbering and bullets are stripped.
            assert not any(fact in prompt for fact in spec["facts"]) and "answer_index" not in prompt
            assert all(not fact[0].isdigit() and not fact.startswith("-") for fact in spec["facts"])

    by_id = {row["extra_info"]["env"]["id"]: row["extra_info"]["env"] for _, row in pd.concat([train, test]).iterrows()}
    assert list(by_id["part_a-1"]["facts"]) == ["Hidden fact alpha 1.", "Hidden fact beta 1.", "Hidden fact gamma 1."]
    assert list(by_id["part_b-9"]["facts"])[0] == "Atomic fact 1 of case 9."  # atomic_facts accepted
    assert by_id["part_b-8"]["initial"] == "A 28-year-old man has chest pain."  # literal context parsed
    assert by_id["part_a-2"]["answer_index"] == 2

    # Same seed: the same files; another seed: another split.
    again, _ = build_mediq_dataset([data], tmp_path / "again", seed=3, n_val=3, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(again["test"]), test)
    other, _ = build_mediq_dataset([data], tmp_path / "other", seed=4, n_val=3, progress=False)
    other_ids = {r["extra_info"]["env"]["id"] for _, r in pd.read_parquet(other["test"]).iterrows()}
    assert other_ids != {r["extra_info"]["env"]["id"] for _, r in test.iterrows()}


def test_parquet_row_plays_an_episode(tmp_path):
    """A row read back by pandas (numpy arrays inside) builds the environment, which asks the patient
    with the row's facts."""

    class Patient:
        async def chat(self, messages, **kwargs):
            assert "3. Hidden fact gamma" in messages[0]["content"]
            return ChatReply("3", ok=True)

    paths, _ = build_mediq_dataset([write_fixture(tmp_path / "raw")], tmp_path / "out", seed=0, progress=False)
    row = pd.read_parquet(paths["train"]).iloc[0]
    env = make_env(row["extra_info"]["env"], context=EnvContext(simulator=Patient()))
    step = asyncio.run(env.step("<interact>Query: anything else?</interact>"))
    assert step.label.critique == 1 and step.observation.startswith("Patient: Hidden fact gamma")


def test_cli_and_errors(tmp_path, capsys):
    data = write_fixture(tmp_path / "raw")
    out = tmp_path / "cli"
    code = cli_main(
        ["data", "mediq", "--input", str(data / "part_a.jsonl"), "--out", str(out), "--val-fraction", "0.25",
         "--max-turns", "6", "--no-counterfactual-bt", "--no-progress"]
    )
    assert code == 0 and "skipped rows: no_facts=1" in capsys.readouterr().out
    train = pd.read_parquet(out / "train.parquet")
    assert len(train) == 6 and len(pd.read_parquet(out / "test.parquet")) == 2
    assert train.iloc[0]["extra_info"]["env"]["max_turns"] == 6
    assert not train.iloc[0]["extra_info"]["env"]["counterfactual_bt"]

    assert cli_main(["data", "mediq", "--out", str(out)]) == 2
    assert "give --input FILE_OR_FOLDER" in capsys.readouterr().err
    with pytest.raises(MediQDataError, match="no such file"):
        build_mediq_dataset([tmp_path / "missing.jsonl"], out, progress=False)
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(MediQDataError, match=r"broken.jsonl:2: not a JSON line"):
        read_cases([tmp_path / "broken.jsonl"])
    with pytest.raises(ValueError, match="--n-val"):
        build_mediq_dataset([data], out, n_val=99, progress=False)


def test_rows_without_an_id_are_named_by_their_line(tmp_path):
    """Id-less rows (key missing, null or blank) are distinct cases named by their line, the same on every
    read; a real duplicate id is still dropped."""
    rows = [official_row(0), official_row(1), official_row(2), official_row(3), official_row(0)]
    del rows[1]["id"]
    rows[2]["id"] = None
    rows[3]["id"] = "  "
    path = tmp_path / "no_ids.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    cases, skipped = read_cases([path])
    # Line 2 is blank: the id-less rows sit on lines 3, 4 and 5.
    assert [c.case_id for c in cases] == ["no_ids-0", "no_ids-line3", "no_ids-line4", "no_ids-line5"]
    assert [c.question for c in cases[1:]] == [f"Which treatment fits case {i}?" for i in (1, 2, 3)]
    assert dict(skipped) == {"duplicate_id": 1}
    again, _ = read_cases([path])
    assert [c.case_id for c in again] == [c.case_id for c in cases]  # stable


def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch):
    from fixtures.openai_servers import free_port

    monkeypatch.setattr(mediq_data, "OFFICIAL_URLS", {"all_dev_good.jsonl": f"http://127.0.0.1:{free_port()}/x"})
    with pytest.raises(MediQDataError, match="could not download .*pass them with --input"):
        download_official(tmp_path / "raw", timeout_s=2)
    assert not (tmp_path / "raw" / "all_dev_good.jsonl").exists()


@pytest.mark.skipif(
    not (REAL_MEDIQ / "all_dev_good.jsonl").exists(),
    reason=f"the official MediQ files are not at {REAL_MEDIQ} (a fresh clone has no ../shared/data); "
    "the fixture tests above cover the same code paths",
)
def test_real_mediq_files(tmp_path):
    paths, skipped = build_mediq_dataset([REAL_MEDIQ], tmp_path / "real", seed=0, n_val=300, progress=False)
    assert dict(skipped) == {"no_facts": 3}  # three rows of all_dev_good have no facts
    train, test = pd.read_parquet(paths["train"]), pd.read_parquet(paths["test"])
    assert (len(train), len(test)) == (1272 - 3 + 140 - 300, 300)
    specs = [row["env"] for row in pd.concat([train, test])["extra_info"]]
    assert len({spec["id"] for spec in specs}) == len(specs)
    assert {spec["source"] for spec in specs} == {"all_dev_good", "all_craft_md"}
    assert all(len(spec["options"]) == 4 and 0 <= spec["answer_index"] <= 3 for spec in specs)
    n_facts = [len(spec["facts"]) for spec in specs]
    assert min(n_facts) >= 1 and max(n_facts) == 35  # data notes: at most 35 facts per case
    assert not any(re.match(r"\d+[.)]\s|-", fact) for spec in specs for fact in spec["facts"])
