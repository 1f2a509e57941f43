"""Hostile training logs and eval summaries for ``verl-selflock plot``: malformed lines are skipped and
counted (never fatal), non-finite values are left out and counted, a summary.json that cannot be plotted
is one line naming the file; generated, seeded malformed logs of every format read back exactly the good
lines."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from verl_selflock.cli import main
from verl_selflock.diagnostics.logs import SkipReport, read_training_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REWARD, AS = "critic/score/mean", "selflock/as_proxy"
NOT_UTF8 = b"\xff\xfe\xfa"


# --- generated logs: (good lines, bad lines, non-finite values) known by construction ------------------------

def _jsonl(step, reward, as_proxy) -> bytes:
    return json.dumps({"step": step, "data": {REWARD: reward, AS: as_proxy}}).encode()


def _jsonl_bad(rng: random.Random, step: int) -> bytes:
    good = _jsonl(step, 0.5, 0.5)
    return rng.choice([
        good[: rng.randrange(1, len(good) - 1)],  # truncated: a killed run's last line
        NOT_UTF8 + good,
        good.replace(b'"step": %d' % step, b'"step": "abc"'),
        good.replace(b'"step": %d' % step, b'"step": NaN'),
        good.replace(b'"step": %d' % step, b'"step": Infinity'),
        good.replace(b'"step": %d' % step, b'"step": "-inf"'),
        good.replace(b'"step": %d' % step, b'"step": 2.5'),
        good.replace(b'"step": %d' % step, b'"step": true'),
        good.replace(b'"step": %d' % step, b'"step": [1]'),
        good.replace(b'"step": %d' % step, b'"step": 1e300'),
        good.replace(b'"step": %d' % step, b'"step": ' + b"9" * 400),
        good.replace(b'"step": %d, ' % step, b""),  # no step
        b"[1, 2, 3]",
        good[:10] + b"\x00" + good[10:],
        b"[" * 50_000 + b"]" * 50_000,
    ])


def _huge(rng: random.Random) -> float:
    """A value matplotlib cannot draw (its axis arithmetic overflows), left out like NaN."""
    return rng.choice([math.nan, math.inf, -math.inf, 1e308, -1.7e308])


def _console(step, reward, as_proxy) -> bytes:
    return f"step:{step} - {REWARD}:np.float64({reward}) - {AS}:{as_proxy} - timing/gen:1.5".encode()


def _console_bad(rng: random.Random, step: int) -> bytes:
    return rng.choice([NOT_UTF8 + _console(step, 0.5, 0.5), _console(10**30, 0.5, 0.5)])


WIDE_HEADER = f"Step,arew - {REWARD},arew - {AS},arew - {AS}__MIN".encode()


def _wide(step, reward, as_proxy) -> bytes:
    return f"{step},{reward},{as_proxy},0.0".encode()


def _csv_bad(rng: random.Random, good: bytes, step_first: bool) -> bytes:
    fields = good.split(b",")
    at = 0 if step_first else 1
    bad_step = rng.choice([b"abc", b"nan", b"inf", b"-Infinity", b"", b"2.5", b"1e400", b"\x00"])
    return rng.choice([
        b",".join(fields[:-1]),  # short
        good + b",7",  # extra field
        NOT_UTF8 + good,
        b",".join([*fields[:at], bad_step, *fields[at + 1:]]),
        b'"' + b"x" * 200_000 + b'"',  # over csv's field size limit
    ])


def _tensorboard(step, value) -> bytes:
    return f"1700000000.5,{step},{value}".encode()


def generate(rng: random.Random, kind: str, folder: Path, number: int):
    """A malformed log of ``kind``: (path, expected series, bad lines, non-finite values)."""
    lines: list[bytes] = []
    expected: dict[str, dict[int, float]] = {}
    bad = nonfinite = 0
    name = {"jsonl": "run.jsonl", "console": "run.log", "wide": "run.csv",
            "tensorboard": "run-arew-tag-selflock_as_proxy.csv"}[kind]
    if kind == "wide":
        lines.append(WIDE_HEADER)
    elif kind == "tensorboard":
        lines.append(b"Wall time,Step,Value")
    for step in range(1, rng.randint(2, 60)):
        if rng.random() < 0.3:  # a malformed line
            bad += 1
            if kind == "jsonl":
                lines.append(_jsonl_bad(rng, step))
            elif kind == "console":
                lines.append(_console_bad(rng, step))
            else:
                good = _wide(step, 0.5, 0.5) if kind == "wide" else _tensorboard(step, 0.5)
                lines.append(_csv_bad(rng, good, step_first=kind == "wide"))
            continue
        if kind == "console" and rng.random() < 0.2:
            lines.append(b"(TaskRunner pid=1) noise step: - not a metric line")  # noise, not a bad line
        reward, as_proxy = round(rng.random(), 3), round(rng.random(), 3)
        if rng.random() < 0.1:
            reward = _huge(rng)
            nonfinite += kind != "tensorboard"  # the tensorboard file holds only the AS proxy
        if kind == "jsonl":
            lines.append(_jsonl(step, reward, as_proxy))
        elif kind == "console":
            lines.append(_console(step, reward, as_proxy))
        elif kind == "wide":
            lines.append(_wide(step, reward, as_proxy))
        else:
            lines.append(_tensorboard(step, as_proxy))
        if abs(reward) <= 1 and kind != "tensorboard":  # NaN compares False: left out too
            expected.setdefault(REWARD, {})[step] = reward
        expected.setdefault(AS, {})[step] = as_proxy
    if not expected.get(AS):  # at least one good line
        lines.append({"jsonl": _jsonl, "console": _console, "wide": _wide}.get(kind, lambda s, r, a: _tensorboard(s, a))(
            999, 0.25, 0.75))
        expected.setdefault(AS, {})[999] = 0.75
        if kind != "tensorboard":
            expected.setdefault(REWARD, {})[999] = 0.25
    if kind == "console":
        expected["timing/gen"] = {step: 1.5 for step in expected[AS]}
    path = folder / f"{number:03d}-{name}"
    path.write_bytes(b"\n".join(lines) + rng.choice([b"\n", b"", b"\r\n"]))
    return path, expected, bad, nonfinite


@pytest.mark.parametrize("kind", ["jsonl", "console", "wide", "tensorboard"])
def test_generated_malformed_logs_read_back_exactly_their_good_lines(tmp_path, kind):
    rng = random.Random(f"selflock-logs-{kind}")
    for number in range(60):
        path, expected, bad, nonfinite = generate(rng, kind, tmp_path, number)
        report = SkipReport()
        assert read_training_log(path, report) == expected, path.read_bytes()[:400]
        assert (report.lines, report.nonfinite) == (bad, nonfinite), report.summary()
        assert len(report.examples) == min(bad, 3) and all(str(path) in e for e in report.examples)


def test_plot_of_malformed_logs_says_how_many_lines_it_skipped(tmp_path, capsys):
    rng = random.Random(7)
    runs = []
    for number, kind in enumerate(["jsonl", "console", "wide"]):
        path, _, bad, nonfinite = generate(rng, kind, tmp_path, number)
        while not bad:  # this test is about the message: take a file that has bad lines
            path, _, bad, nonfinite = generate(rng, kind, tmp_path, number)
        runs.append((kind, path, bad, nonfinite))
    out = tmp_path / "train.png"
    assert main(["plot", "train", "--runs", *(f"{kind}={path}" for kind, path, _, _ in runs), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    err = capsys.readouterr().err
    for kind, path, bad, nonfinite in runs:
        assert f"run '{kind}': skipped {bad} malformed line(s) (first: {path}:" in err
        assert (f"ignored {nonfinite} non-finite value(s)" in err) == bool(nonfinite)


# --- the malformed inputs that each killed a whole plot -----------------------------------------------------

GOOD = b'{"step": 1, "data": {"critic/score/mean": 0.2}}\n{"step": 2, "data": {"critic/score/mean": 0.3}}\n'
TRAIN_INPUTS = [  # (file name, content, lines skipped)
    ("a.jsonl", GOOD + b'{"step": "three", "data": {}}\n', 1),
    ("b.jsonl", GOOD + b'{"step": NaN, "data": {}}\n{"step": Infinity, "data": {}}\n', 2),
    ("c.jsonl", GOOD + b'{"step": 1e999, "data": {}}\n{"step": -1e999, "data": {}}\n', 2),
    ("d.jsonl", GOOD + b'{"step": 3, "data": {"crit', 1),
    ("e.jsonl", b'\xff\xfe{"step": 0}\n' + GOOD, 1),
    ("f.jsonl", GOOD + b'{"step": {"a": 1}}\n"just a string"\n', 2),
    ("g.log", b"step:1 - critic/score/mean:0.5\n\xff\xfe garbage \x80\nstep:2 - critic/score/mean:0.4\n", 1),
    ("h.csv", b"step,critic/score/mean\n1,0.2\nx,0.3\nnan,0.1\ninf,0.1\n", 3),
    ("i.csv", b"step,critic/score/mean\n1,0.2\n2\n3,0.1,9\n", 2),
    ("j.csv", b"step,critic/score/mean\n1,0.2\n\xff,0.4\n", 1),
    ("run-x-tag-critic_score_mean.csv", b"Wall time,Step,Value\n1.0,1,0.2\n2.0,two,0.3\n3.0,nan,0.1\n4.0,4\n", 3),
    ("k.csv", b"\xef\xbb\xbfstep,critic/score/mean\n1,0.2\n2,0.3\n", 0),  # a byte-order mark is not an error
]


@pytest.mark.parametrize("name, content, skipped", TRAIN_INPUTS, ids=[case[0] for case in TRAIN_INPUTS])
def test_malformed_training_logs_are_skipped_and_counted(tmp_path, capsys, name, content, skipped):
    log = tmp_path / name
    log.write_bytes(content)
    out = tmp_path / "train"  # no suffix: PNG
    assert main(["plot", "train", "--runs", f"run={log}", "--out", str(out)]) == 0
    assert (tmp_path / "train.png").read_bytes().startswith(PNG_MAGIC)
    err = capsys.readouterr().err
    assert (f"skipped {skipped} malformed line(s)" in err) == bool(skipped), err


def test_a_log_with_nothing_usable_is_one_line_that_counts_the_skipped_lines(tmp_path, capsys):
    log = tmp_path / "binary.jsonl"
    log.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 100)
    assert main(["plot", "train", "--runs", f"run={log}", "--out", str(tmp_path / "t.png")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{log}: no per-step metrics found" in line and "malformed line(s) skipped" in line
    assert not (tmp_path / "t.png").exists()


def _summary(**metrics) -> dict:
    base = {key: {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6} for key in ("success_rate", "as_proxy", "turns")}
    return {"episodes": 10, "metrics": {**base, **metrics}}


SUMMARIES = [  # (summary.json bytes, texts of the one line)
    (b"[1, 2]", ["expected a JSON object", "got list"]),
    (b'"summary"', ["expected a JSON object", "got str"]),
    (b"null", ["expected a JSON object"]),
    (b'{"metrics": [1]}', ["'metrics' must be an object"]),
    (b'{"episodes": 3,\n "metrics": {', ["summary.json:2:", "not valid JSON"]),
    (b"\xff\xfe{}", ["not UTF-8"]),
    (b"", ["summary.json:1:", "not valid JSON"]),
    (json.dumps(_summary(success_rate=[0.5])).encode(), ["metrics.success_rate must be an object"]),
    (json.dumps(_summary(success_rate={"value": "high"})).encode(), ["metrics.success_rate.value is not a number"]),
    (json.dumps(_summary(turns={"value": math.inf})).encode(), ["metrics.turns.value is inf", "not a finite number"]),
    (json.dumps(_summary(as_proxy={"value": 0.5, "ci_low": -math.inf})).encode(), ["metrics.as_proxy.ci_low is -inf"]),
    (json.dumps(_summary(turns={"value": 1e308})).encode(), ["metrics.turns.value is 1e+308", "plottable"]),
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
]


@pytest.mark.parametrize("content, texts", SUMMARIES, ids=[f"summary{i}" for i in range(len(SUMMARIES))])
def test_an_unplottable_summary_is_one_line_naming_the_file(tmp_path, capsys, content, texts):
    (tmp_path / "summary.json").write_bytes(content)
    assert main(["plot", "eval", "--runs", f"run={tmp_path}", "--out", str(tmp_path / "eval.png")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "summary.json" in line and "Traceback" not in line
    for text in texts:
        assert text in line, line
    assert not (tmp_path / "eval.png").exists()


def test_a_summary_with_nan_estimates_and_odd_episode_counts_still_plots(tmp_path, capsys):
    summary = _summary(bt_proxy={"value": math.nan, "ci_low": None, "ci_high": math.nan})
    summary["episodes"] = "x" * 100_000  # a label, not a number: drawn as "?"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["plot", "eval", "--runs", f"run={tmp_path}", "--out", str(tmp_path / "eval.svg")]) == 0
    assert b"<svg" in (tmp_path / "eval.svg").read_bytes()[:1000]
    assert capsys.readouterr().out.strip().endswith("eval.svg")


def test_plot_out_is_written_atomically_over_an_old_file(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_bytes(GOOD)
    out = tmp_path / "plots" / "train"
    assert main(["plot", "train", "--runs", f"run={log}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}.png"
    first = (tmp_path / "plots" / "train.png").read_bytes()
    log.write_bytes(GOOD.replace(b"0.3", b"0.9"))
    assert main(["plot", "train", "--runs", f"run={log}", "--out", str(out) + ".png"]) == 0
    assert (tmp_path / "plots" / "train.png").read_bytes() != first
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["train.png"]  # no temporary file left
