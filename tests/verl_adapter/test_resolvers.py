"""Build-once caching and the OmegaConf resolvers that the CPU recipe uses."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from verl_selflock.cache import COMPLETE_MARKER, build_once
from verl_selflock.verl_adapter.resolvers import agent_loop_yaml, pe_data_dir, register_resolvers


def _slow_build(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "builds.txt", "a") as f:
        f.write("built\n")
    time.sleep(0.3)


def _call_build_once(folder: str) -> None:
    build_once(folder, _slow_build)


def test_build_once_builds_once_across_processes(tmp_path):
    folder = tmp_path / "thing"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_call_build_once, args=(str(folder),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (folder / "builds.txt").read_text() == "built\n"
    assert (folder / COMPLETE_MARKER).exists()


def test_build_once_redoes_a_crashed_build(tmp_path):
    folder = tmp_path / "thing"

    def crash(path: Path) -> None:
        path.mkdir(parents=True)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(folder, crash)
    assert not (folder / COMPLETE_MARKER).exists()
    calls = []
    build_once(folder, lambda path: calls.append(path))
    assert calls == [folder] and (folder / COMPLETE_MARKER).exists()


def test_pe_data_resolver_builds_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path / "cache"))
    register_resolvers()
    cfg = OmegaConf.create({"data": "${selflock.pe_data:gated,2,4,2,7,4}"})
    folder = Path(cfg.data)
    assert folder.parent == tmp_path / "cache" / "data"
    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    assert (len(train), len(test)) == (4, 2)
    stamp = (folder / "train.parquet").stat().st_mtime_ns
    assert pe_data_dir("gated", 2, 4, 2, 7, 4) == str(folder)  # second call: cached, not rebuilt
    assert (folder / "train.parquet").stat().st_mtime_ns == stamp


def test_agent_loop_yaml_resolver_validates_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path / "cache"))
    path = agent_loop_yaml("max_turn_tokens=48", "simulator={base_url: 'http://localhost:8000/v1', model: m}")
    entry = OmegaConf.load(path)[0]
    assert entry.max_turn_tokens == 48 and entry.simulator.model == "m"
    assert agent_loop_yaml("max_turn_tokens=48", "simulator={base_url: 'http://localhost:8000/v1', model: m}") == path
    with pytest.raises(ValueError, match="max_turn_tokenz.*did you mean 'max_turn_tokens'"):
        agent_loop_yaml("max_turn_tokenz=48")
    with pytest.raises(ValueError, match="simulator.base_url"):
        agent_loop_yaml("simulator={base_url: localhost, model: m}")
