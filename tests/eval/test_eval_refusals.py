"""``verl-selflock eval`` refuses what it cannot run honestly: an empty test set, a resumed
``episodes.jsonl`` with lines that are not its records, a second process on the same ``--out``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from verl_selflock.data.pe import build_pe_dataset
from verl_selflock.errors import UserError
from verl_selflock.eval import runner
from verl_selflock.eval.preflight import OWNER_FILE, OutLock

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSWER = "<answer>1,1,1,2,2,2</answer>"


@pytest.fixture(scope="module")
def pe_file(tmp_path_factory) -> str:
    return build_pe_dataset("gated", 3, 0, 3, seed=0, out_dir=tmp_path_factory.mktemp("pe"), progress=False)["test"]


@pytest.fixture(scope="module")
def answer_server():
    """A policy endpoint that answers at once (one turn per episode)."""
    from fixtures.openai_servers import FaultServer

    with FaultServer("ok", reply=ANSWER) as server:
        yield server


def eval_cli(data: str, out: Path, base_url: str) -> int:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    argv = ["--data", data, "--out", str(out), "--base-url", base_url, "--model", "m", "--retries", "0", "--no-progress"]
    return runner.run(parser.parse_args(argv))


def test_an_empty_test_set_is_refused_naming_the_file(pe_file, tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.read_parquet(pe_file).iloc[:0].to_parquet(empty)
    with pytest.raises(UserError, match=rf"^--data {empty}: the test set has no rows"):
        eval_cli(str(empty), tmp_path / "out", "http://127.0.0.1:9/v1")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_parquet_is_refused_naming_it(tmp_path):
    junk = tmp_path / "test.parquet"
    junk.write_bytes(b"\x00\xffnot a parquet file at all" * 10)
    with pytest.raises(UserError, match=rf"^--data {junk}: not a readable parquet file"):
        eval_cli(str(junk), tmp_path / "out", "http://127.0.0.1:9/v1")


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('{"episode": "no id here", "reward": 1.0}', "is a record without an 'id'"),
        ("this is not json", "is not JSON"),
        ("[1, 2, 3]", "is JSON but not an object (a list)"),
        ('{"id": [1, 2]}', "has an 'id' that is not a string"),
        ("\x00\x01 binary", "is not JSON"),
    ],
)
def test_a_resumed_line_that_is_not_a_record_is_refused_naming_file_and_line(pe_file, tmp_path, answer_server, line, said):
    out = tmp_path / "out"
    assert eval_cli(pe_file, out, answer_server.base_url) == 0
    episodes = out / "episodes.jsonl"
    first, *rest = episodes.read_text().splitlines(keepends=True)
    episodes.write_text(first + line + "\n" + "".join(rest))
    before = len(answer_server.requests)
    with pytest.raises(UserError) as refused:
        eval_cli(pe_file, out, answer_server.base_url)
    message = str(refused.value)
    assert message.startswith(f"{episodes}:2: {said}") and "\n" not in message
    assert len(answer_server.requests) == before  # refused before any request


def test_a_truncated_last_line_is_cut_and_its_episode_run_again(pe_file, tmp_path, answer_server, caplog):
    out = tmp_path / "out"
    assert eval_cli(pe_file, out, answer_server.base_url) == 0
    episodes = out / "episodes.jsonl"
    lines = episodes.read_text().splitlines(keepends=True)
    episodes.write_text("".join(lines[:-1]) + lines[-1][:40])  # killed mid-write
    assert eval_cli(pe_file, out, answer_server.base_url) == 0
    ids = [json.loads(line)["id"] for line in episodes.read_text().splitlines()]
    assert len(ids) == 3 == len(set(ids))
    assert "removed a partial last record" in caplog.text


def _hold_lock_in_another_process(out: Path) -> subprocess.Popen:
    """A second process that takes the folder's lock the way eval does and keeps it until killed."""
    code = (
        "import sys, time; from verl_selflock.eval.preflight import OutLock; "
        f"lock = OutLock({str(out)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_on_the_same_out_is_refused_naming_the_other(pe_file, tmp_path, answer_server):
    out = tmp_path / "out"
    holder = _hold_lock_in_another_process(out)
    try:
        before = len(answer_server.requests)
        with pytest.raises(UserError) as refused:
            eval_cli(pe_file, out, answer_server.base_url)
        message = str(refused.value)
        assert message.startswith(f"--out {out}: another eval is writing to this folder (pid {holder.pid} on ")
        assert len(answer_server.requests) == before and not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait(10)
    # The holder died without releasing anything: the kernel dropped its lock, the next run proceeds.
    assert eval_cli(pe_file, out, answer_server.base_url) == 0
    assert not (out / OWNER_FILE).exists()  # released at the end of the run


def test_the_lock_is_exclusive_within_one_process_and_released_on_refusal(pe_file, tmp_path):
    out = tmp_path / "out"
    with OutLock(out), pytest.raises(UserError, match=rf"--out {out}: another eval .*\(pid {os.getpid()} on "):
        OutLock(out).acquire()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        OutLock(a_file).acquire()
    # A run refused inside the lock (here: a run.json that is not a run's settings) leaves it unlocked.
    (out / "run.json").write_text("[]")
    with pytest.raises(UserError, match="run.json: not the JSON object"):
        eval_cli(pe_file, out, "http://127.0.0.1:9/v1")
    with OutLock(out):
        assert json.loads((out / OWNER_FILE).read_text())["pid"] == os.getpid()
