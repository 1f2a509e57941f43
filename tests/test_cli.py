"""``verl-selflock``: a user's mistake (bad argument, missing or corrupt file, impossible parameter) is one
line on stderr naming what to fix, exit code 2, no traceback; ``--debug`` / ``VERL_SELFLOCK_DEBUG=1``
show the traceback; a bug keeps it. Builders write all their files or none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fixtures.flodial_charts import laptop_chart, write_charts
from fixtures.mediq_rows import official_row

from verl_selflock.cli import main
from verl_selflock.errors import DEBUG_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]


def _error_lines(err: str) -> list[str]:
    # tau2's loguru prints a "No .env file found" warning when tau2 is first imported: not ours to count.
    return [line for line in err.splitlines() if line.strip() and "| WARNING  |" not in line]


def run_user_error(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI in-process; assert exit code 2 and one stderr line holding every ``expected`` text."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Small real inputs in the official schemas: 4 MediQ cases, two FloDial charts; a file and a folder in the way."""
    mediq = tmp_path / "mediq.jsonl"
    mediq.write_text("".join(json.dumps(official_row(i)) + "\n" for i in range(4)))
    charts = write_charts(tmp_path / "flodial", [laptop_chart("alpha"), laptop_chart("beta")])
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "blocked" / "train.parquet").mkdir(parents=True)
    return {"mediq": mediq, "charts": charts, "tmp": tmp_path}


# (argv with {out}, {mediq}, {charts}, {tmp} placeholders, texts the one line must hold)
BAD_ARGUMENTS = [
    ([], "required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["doctor", "extra"], "unrecognized arguments: extra"),
    (["data"], "required: task"),
    (["data", "nope"], "invalid choice: 'nope'"),
    # pe
    (["data", "pe", "--variant", "gated", "--S", "1", "--out", "{out}"], "--S", "got 1"),
    (["data", "pe", "--train", "0", "--test", "0", "--out", "{out}"], "--train", ">= 1"),
    (["data", "pe", "--test", "0", "--out", "{out}"], "--test"),
    (["data", "pe", "--train", "-5", "--out", "{out}"], "--train", "-5"),
    (["data", "pe", "--S", "x", "--out", "{out}"], "argument --S: invalid int value: 'x'"),
    (["data", "pe", "--variant", "partial", "--out", "{out}"], "argument --variant"),
    (["data", "pe", "--S", "6", "--out", "{out}"], "--S", "< D=6"),
    (["data", "pe", "--variant", "full", "--D", "1", "--out", "{out}"], "--D"),
    (["data", "pe", "--variant", "full", "--D", "1000", "--out", "{out}"], "--D", "2..32"),
    (["data", "pe", "--D", "20", "--S", "10", "--out", "{out}"], "focus sets", "--S"),
    (["data", "pe", "--movies", "0", "--out", "{out}"], "--movies"),
    (["data", "pe", "--movies", "21", "--out", "{out}"], "--movies"),
    (["data", "pe", "--max-turns", "7", "--out", "{out}"], "--max-turns", "even"),
    (["data", "pe", "--max-turns", "-2", "--out", "{out}"], "--max-turns"),
    (["data", "pe", "--seed", "-1", "--out", "{out}"], "--seed"),
    (["data", "pe"], "required: --out"),
    (["data", "pe", "--out", "{tmp}/a_file"], "--out", "a_file: is a file"),
    (["data", "pe", "--out", "{tmp}/a_file/sub"], "a_file is a file"),
    (["data", "pe", "--out", "{tmp}/blocked"], "train.parquet is a folder"),
    # mediq
    (["data", "mediq", "--out", "{out}"], "--input", "--download"),
    (["data", "mediq", "--input", "{tmp}/missing.jsonl", "--out", "{out}"], "--input", "missing.jsonl", "no such"),
    (["data", "mediq", "--input", "{tmp}/blocked", "--out", "{out}"], "no *.jsonl files"),
    (["data", "mediq", "--input", "{mediq}", "--n-val", "0", "--out", "{out}"], "--n-val", "1..3"),
    (["data", "mediq", "--input", "{mediq}", "--n-val", "4", "--out", "{out}"], "--n-val"),
    (["data", "mediq", "--input", "{mediq}", "--n-val", "-3", "--out", "{out}"], "--n-val"),
    (["data", "mediq", "--input", "{mediq}", "--val-fraction", "0", "--out", "{out}"], "--val-fraction"),
    (["data", "mediq", "--input", "{mediq}", "--val-fraction", "1.5", "--out", "{out}"], "--val-fraction"),
    (["data", "mediq", "--input", "{mediq}", "--val-fraction", "nan", "--out", "{out}"], "--val-fraction"),
    (["data", "mediq", "--input", "{mediq}", "--val-fraction", "0.1", "--out", "{out}"], "--val-fraction", "--n-val"),
    (["data", "mediq", "--input", "{mediq}", "--n-val", "1", "--val-fraction", "0.2", "--out", "{out}"],
     "not allowed with argument"),
    (["data", "mediq", "--input", "{mediq}", "--max-turns", "5", "--out", "{out}"], "--max-turns"),
    (["data", "mediq", "--input", "{mediq}", "--seed", "-1", "--out", "{out}"], "--seed"),
    (["data", "mediq", "--input", "{mediq}", "--out", "{tmp}/blocked"], "train.parquet is a folder"),
    # flodial
    (["data", "flodial", "--input", "{tmp}/nowhere", "--out", "{out}"], "--input", "nowhere", "not a folder"),
    (["data", "flodial", "--input", "{tmp}/blocked", "--out", "{out}"], "--input", "no FloDial flowcharts"),
    (["data", "flodial", "--input", "{charts}", "--n-candidates", "1", "--out", "{out}"], "--n-candidates"),
    (["data", "flodial", "--input", "{charts}", "--n-candidates", "-4", "--out", "{out}"], "--n-candidates"),
    (["data", "flodial", "--input", "{charts}", "--difficulty", "hard", "--n-candidates", "3", "--out", "{out}"],
     "--n-candidates", "hard"),
    (["data", "flodial", "--input", "{charts}", "--train", "0", "--out", "{out}"], "--train"),
    (["data", "flodial", "--input", "{charts}", "--test", "-1", "--out", "{out}"], "--test"),
    (["data", "flodial", "--input", "{charts}", "--max-turns", "7", "--out", "{out}"], "--max-turns"),
    (["data", "flodial", "--input", "{charts}", "--seed", "-2", "--out", "{out}"], "--seed"),
    (["data", "flodial", "--input", "{charts}", "--split-scheme", "u-flo", "--test-charts", "nope", "--out", "{out}"],
     "--test-charts", "'nope'"),
    (["data", "flodial", "--input", "{charts}", "--split-scheme", "u-flo", "--test-charts", ",", "--out", "{out}"],
     "--test-charts"),
    (["data", "flodial", "--input", "{charts}", "--train", "500", "--test", "1", "--no-progress", "--out", "{out}"],
     "could not draw 500 distinct"),
    (["data", "flodial", "--input", "{charts}", "--out", "{tmp}/blocked"], "train.parquet is a folder"),
    # tau2 (refused before tau2 is needed)
    (["data", "tau2", "--min-turn", "-5", "--out", "{out}"], "--min-turn", "-5"),
    (["data", "tau2", "--min-turn", "99", "--max-turns", "4", "--out", "{out}"], "--min-turn", "0..4"),
    (["data", "tau2", "--max-rows", "-5", "--out", "{out}"], "--max-rows"),
    (["data", "tau2", "--max-turns", "3", "--out", "{out}"], "--max-turns"),
    (["data", "tau2", "--test-size", "-1", "--out", "{out}"], "--test-size"),
    (["data", "tau2", "--seed", "-1", "--out", "{out}"], "--seed"),
    (["data", "tau2", "--split-scheme", "random", "--out", "{out}"], "argument --split-scheme"),
    (["data", "tau2", "--out", "{tmp}/blocked"], "train.parquet is a folder"),
    # eval (argument parsing; its own checks are eval's)
    (["eval"], "required: --data"),
    (["eval", "--data", "d", "--out", "{out}", "--base-url", "u", "--model", "m", "--concurrency", "x"],
     "argument --concurrency"),
    (["eval", "--data", "d", "--out", "{out}", "--base-url", "u", "--model", "m", "--feedback", "loud"],
     "argument --feedback"),
    # plot
    (["plot"], "required: kind"),
    (["plot", "bars", "--runs", "a=b", "--out", "{out}.png"], "invalid choice: 'bars'"),
    (["plot", "train", "--runs", "nameless", "--out", "{out}.png"], "name=path", "'nameless'"),
    (["plot", "train", "--runs", "a=,", "--out", "{out}.png"], "name=path"),
    (["plot", "train", "--runs", "a={tmp}/missing.jsonl", "--out", "{out}.png"], "missing.jsonl", "does not exist"),
    (["plot", "train", "--runs", "a={tmp}/blocked", "--out", "{out}.png"], "blocked: is a folder"),
    (["plot", "train", "--runs", "a={mediq}", "--out", "{out}.png", "--smooth", "0"], "--smooth"),
    (["plot", "train", "--runs", "a={mediq}", "--out", "{tmp}/blocked"], "--out", "is a folder"),
    (["plot", "train", "--runs", "a={mediq}", "--out", "{out}.xyz"], "--out", "'.xyz'"),
    (["plot", "train", "--runs", "a={mediq}", "--out", "{tmp}/a_file/plot.png"], "a_file is a file"),
    (["plot", "train", "--runs", "a={mediq}", "--out", "{out}.png"], "mediq.jsonl", "no per-step metrics"),
    (["plot", "eval", "--runs", "a={tmp}", "--out", "{out}.png"], "summary.json does not exist"),
    (["plot", "eval", "--runs", "a={tmp},{tmp}", "--out", "{out}.png"], "one eval folder per run"),
]


@pytest.mark.parametrize("argv_and_texts", BAD_ARGUMENTS, ids=[" ".join(case[0][:4]) or "none" for case in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_with_exit_code_2(capsys, inputs, argv_and_texts):
    argv, *texts = argv_and_texts
    values = {"out": str(inputs["tmp"] / "out"), "mediq": str(inputs["mediq"]), "charts": str(inputs["charts"]),
              "tmp": str(inputs["tmp"])}
    run_user_error(capsys, [item.format(**values) for item in argv], *texts)
    assert not (inputs["tmp"] / "out").exists()  # refused before anything was written
    assert [p.name for p in (inputs["tmp"] / "blocked").iterdir()] == ["train.parquet"]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (file content, texts the line must hold; {file} is the file's path)
CORRUPT_MEDIQ = [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff", ["{file}:1:", "not UTF-8"]),
    (json.dumps(official_row(0)).encode() + b'\n{"id": 1, "question": "Which', ["{file}:2:", "not a JSON line"]),
    (json.dumps(official_row(0)).encode() + b"\n[1, 2]\n", ["{file}:2:", "expected a JSON object"]),
    ("\n".join(json.dumps(official_row(i)) for i in range(2)).encode("utf-16"), ["{file}:1:", "not UTF-8"]),
    (json.dumps(official_row(0)).encode() + b"\n" + _nested(100_000).encode(), ["{file}:2:", "JSON"]),
    (b"\n\n", ["no usable MediQ case"]),
    (json.dumps(official_row(0, facts=[])).encode(), ["no usable MediQ case", "no_facts"]),
    (b"{}\x00{}\n", ["{file}:1:", "not a JSON line"]),
]


@pytest.mark.parametrize("content, texts", CORRUPT_MEDIQ, ids=[f"mediq{i}" for i in range(len(CORRUPT_MEDIQ))])
def test_corrupt_mediq_files_name_the_file_and_line(capsys, tmp_path, content, texts):
    file = tmp_path / "cases.jsonl"
    file.write_bytes(content)
    run_user_error(capsys, ["data", "mediq", "--input", str(file), "--out", str(tmp_path / "out"), "--no-progress"],
                   *(text.format(file=file) for text in texts))
    assert not (tmp_path / "out").exists()


def _chart_with(**changes) -> bytes:
    chart = laptop_chart("broken")
    chart.update(changes)
    return json.dumps(chart, indent=1).encode()


CORRUPT_CHARTS = [
    (b"\xff\xfe\x00\x01binary", ["broken.json", "line 1", "not UTF-8"]),
    (_chart_with()[:200], ["broken.json", "not valid JSON"]),
    (b'{"name": "x",\n "nodes": {\n', ["broken.json", "line 3", "not valid JSON"]),
    (b"[1, 2, 3]", ["broken.json", "expected a JSON object"]),
    (b"42", ["broken.json", "expected a JSON object"]),
    (_nested(100_000).encode(), ["broken.json", "JSON"]),
    (_chart_with(edges=[["1", "2"]]), ["broken.json", "needs 'nodes' and 'edges' objects"]),
    (_chart_with(edges={**laptop_chart()["edges"], "1": ["2", "3"]}), ["broken.json", "edges of node '1'"]),
    (_chart_with(edges={**laptop_chart()["edges"], "1": 5}), ["broken.json", "edges of node '1'"]),
    (_chart_with(nodes={"1": "text"}), ["broken.json", "node '1' has no utterance"]),
    (_chart_with(nodes={str(i): {"utterance": "q"} for i in range(1, 2100)}), ["broken.json", "2099 nodes"]),
]


@pytest.mark.parametrize("content, texts", CORRUPT_CHARTS, ids=[f"chart{i}" for i in range(len(CORRUPT_CHARTS))])
def test_corrupt_flowcharts_name_the_file(capsys, tmp_path, content, texts):
    charts = write_charts(tmp_path / "flodial", [laptop_chart("alpha")])
    (charts / "broken.json").write_bytes(content)
    run_user_error(capsys, ["data", "flodial", "--input", str(charts), "--out", str(tmp_path / "out"), "--no-progress"],
                   *texts)
    assert not (tmp_path / "out").exists()


def test_gated_pe_with_a_focus_of_one_is_refused_and_drawing_is_bounded(monkeypatch):
    """S = 1 used to hang: every query dominated, so instance sampling redrew forever."""
    import numpy as np

    from verl_selflock.data import pe_instances as pe

    with pytest.raises(ValueError, match="--S"):
        pe.PEDataConfig("gated", 6, 1, 10)
    # Whatever the parameters, the draw loop ends: tables that can never qualify give an error, not a hang.
    monkeypatch.setattr(pe, "count_informative_queries", lambda movies, S: (0, 1))
    with pytest.raises(ValueError, match=f"in {pe.MAX_DRAWS} draws"):
        pe.sample_pe_instance(np.random.default_rng(0), pe.PEDataConfig("full", 2, None, 10, n_movies=2))


def test_debug_flag_and_variable_show_the_traceback(capsys, monkeypatch, tmp_path):
    argv = ["data", "pe", "--S", "1", "--out", str(tmp_path / "out")]
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "InvalidInput" in err and err.rstrip().splitlines()[-1].startswith("verl-selflock")
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(argv) == 2 and "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only user errors are shortened: anything else is ours to fix and must show where it happened."""
    from verl_selflock.data import pe

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(pe, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["data", "pe", "--out", str(tmp_path / "out")])


def test_the_installed_command_line_answers_in_one_line(tmp_path):
    """The real process: exit status 2 and one stderr line (``python -m verl_selflock.cli``)."""
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "verl_selflock.cli", "data", "pe", "--variant", "gated", "--S", "1", "--out",
         str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120, check=False,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--S" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_builders_write_all_splits_or_none(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["data", "pe", "--train", "3", "--test", "2", "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.parquet", "test.parquet"}

    calls = []

    def disk_full_on_the_second_file(self, path, *args, **kwargs):  # what a full disk does to pyarrow's writer
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PAR1 partial")
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    original = pd.DataFrame.to_parquet
    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full_on_the_second_file)
    run_user_error(capsys, ["data", "pe", "--train", "4", "--test", "2", "--seed", "9", "--out", str(out),
                            "--no-progress"], "--out", "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old files intact, no temporary left
    fresh = tmp_path / "fresh"
    calls.clear()
    run_user_error(capsys, ["data", "pe", "--train", "4", "--test", "2", "--out", str(fresh), "--no-progress"], "--out")
    assert not fresh.exists()  # the folder it created is gone again


def test_help_still_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "--debug" in capsys.readouterr().out


def test_doctor_reports_a_broken_verl_instead_of_crashing(monkeypatch, capsys):
    """An environment without a working veRL is what doctor is for: a FAIL line and exit 1, no traceback."""
    monkeypatch.setitem(sys.modules, "verl", None)  # `import verl` now raises ImportError, as when not installed
    assert main(["doctor"]) == 1
    captured = capsys.readouterr()
    assert "[FAIL] import verl failed" in captured.out and "1 problem(s)" in captured.out
    assert "Traceback" not in captured.out + captured.err
