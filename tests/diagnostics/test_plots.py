"""Training-log readers (veRL JSONL and console, wandb and tensorboard CSV) and the PNG plots."""

from __future__ import annotations

import json

import pytest

from verl_selflock.cli import main
from verl_selflock.diagnostics.logs import read_training_log, read_training_logs
from verl_selflock.eval.store import EpisodeStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path, reward, as_proxy, locked=()):
    lines = [
        {"step": step, "data": {"critic/score/mean": r, "selflock/as_proxy": a, "selflock/bt_proxy": 0.5,
                                "selflock/self_locking": float(step in locked)}}
        for step, (r, a) in enumerate(zip(reward, as_proxy), start=1)
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_readers_accept_every_documented_format(tmp_path):
    jsonl = _jsonl(tmp_path / "run.jsonl", [0.1, 0.2], [0.7, 0.6])
    assert read_training_log(jsonl)["critic/score/mean"] == {1: 0.1, 2: 0.2}
    console = tmp_path / "console.log"
    console.write_text("(TaskRunner) noise\nstep:1 - critic/score/mean:np.float64(0.25) - selflock/as_proxy:0.5\n"
                       "step:2 - critic/score/mean:0.5 - selflock/as_proxy:0.4\n")
    assert read_training_log(console)["critic/score/mean"] == {1: 0.25, 2: 0.5}
    wandb = tmp_path / "wandb.csv"
    wandb.write_text("Step,arew - selflock/as_proxy,arew - selflock/as_proxy__MIN\n1,0.3,0.1\n2,0.4,0.2\n")
    assert read_training_log(wandb) == {"selflock/as_proxy": {1: 0.3, 2: 0.4}}
    tensorboard = tmp_path / "run-arew-tag-selflock_bt_proxy.csv"
    tensorboard.write_text("Wall time,Step,Value\n1.0,1,0.2\n2.0,2,0.3\n")
    merged = read_training_logs([wandb, tensorboard])
    assert merged["selflock/bt_proxy"] == {1: 0.2, 2: 0.3} and "selflock/as_proxy" in merged
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no per-step metrics"):
        read_training_log(empty)


def test_a_wandb_export_of_several_runs_is_refused_naming_them(tmp_path, capsys):
    """Merging two runs' columns into one series would silently plot a mix of both."""
    export = tmp_path / "wandb.csv"
    export.write_text("Step,vanilla - selflock/as_proxy,arew - selflock/as_proxy,arew - selflock/as_proxy__MIN\n"
                      "1,0.3,0.8,0.7\n2,0.2,0.9,0.8\n")
    with pytest.raises(ValueError, match=r"holds 2 wandb runs \('vanilla', 'arew'\).*one run"):
        read_training_log(export)
    assert main(["plot", "train", "--runs", f"both={export}", "--out", str(tmp_path / "train.png")]) == 2
    assert "'vanilla', 'arew'" in capsys.readouterr().err
    assert not (tmp_path / "train.png").exists()


def test_plot_train_and_eval_write_pngs(tmp_path, capsys):
    steps = 12
    vanilla = _jsonl(tmp_path / "vanilla.jsonl", [0.1 + 0.02 * i for i in range(steps)],
                     [0.8 - 0.04 * i for i in range(steps)], locked={10, 11, 12})
    arew = _jsonl(tmp_path / "arew.jsonl", [0.1 + 0.03 * i for i in range(steps)], [0.6 + 0.02 * i for i in range(steps)])
    out = tmp_path / "train.png"
    assert main(["plot", "train", "--runs", f"vanilla={vanilla}", f"arew={arew}", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000

    summaries = {}
    for name, success in (("vanilla", 0.2), ("arew", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        metrics = {key: {"value": v, "ci_low": max(0, v - 0.1), "ci_high": min(1, v + 0.1), "n": 30, "ci": "wilson"}
                   for key, v in (("success_rate", success), ("as_proxy", 0.7), ("bt_proxy", 0.4),
                                  ("finish_ratio", 0.9), ("invalid_ratio", 0.05), ("repeat_ratio", 0.0))}
        metrics["turns"] = {"value": 9.5, "ci_low": 9.0, "ci_high": 10.0, "n": 30, "ci": "bootstrap"}
        (folder / "summary.json").write_text(json.dumps({"episodes": 30, "metrics": metrics}))
        summaries[name] = folder
    out = tmp_path / "eval.png"
    assert main(["plot", "eval", "--runs", *(f"{k}={v}" for k, v in summaries.items()), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    assert main(["plot", "eval", "--runs", "nameless", "--out", str(out)]) == 2
    assert "name=path" in capsys.readouterr().err


def test_store_cuts_a_partial_last_line(tmp_path):
    store = EpisodeStore(tmp_path / "episodes.jsonl")
    store.append({"id": "a", "value": float("nan")})
    with open(store.path, "a") as handle:
        handle.write('{"id": "b", "val')  # killed mid-write
    assert store.repair() > 0
    store.append({"id": "c"})
    assert [r["id"] for r in store.records()] == ["a", "c"]
    assert next(store.records())["value"] is None  # NaN is stored as null (valid JSON)


def test_plot_eval_with_a_zero_rate_whose_stored_interval_starts_above_it(tmp_path):
    # summary.json files written before wilson_interval clamped its bounds hold ci_low = 5.6e-17 for a
    # rate of 0; matplotlib refuses a negative error bar, so the plot must still draw.
    metrics = {key: {"value": 0.0, "ci_low": 5.551115123125783e-17, "ci_high": 0.56, "n": 3, "ci": "wilson"}
               for key in ("success_rate", "finish_ratio")}
    metrics["as_proxy"] = {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    metrics["turns"] = {"value": 10.0, "ci_low": 10.0, "ci_high": 10.0, "n": 3, "ci": "bootstrap"}
    (tmp_path / "summary.json").write_text(json.dumps({"episodes": 3, "metrics": metrics}))
    out = tmp_path / "eval.png"
    assert main(["plot", "eval", "--runs", f"tiny={tmp_path}", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
