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


def test_agent_loop_yaml_resolver_names_the_packaged_file(tmp_path, monkeypatch):
    """``${selflock.agent_loop_yaml:}`` is the YAML inside the package (on every node that has it); nothing is
    written to the cache any more."""
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path / "cache"))
    register_resolvers()
    cfg = OmegaConf.create({"path": "${selflock.agent_loop_yaml:}"})
    (entry,) = OmegaConf.load(cfg.path)
    assert Path(cfg.path).parent == Path(__import__("verl_selflock").__file__).parent / "verl_adapter"
    assert entry.name == "active_reasoning" and set(entry) == {"name", "_target_"}  # knobs live in the config
    assert not (tmp_path / "cache").exists()


def test_agent_loop_yaml_resolver_keeps_the_old_node_form(tmp_path, monkeypatch):
    """``${selflock.agent_loop_yaml:${selflock_agent_loop}}`` (the recipes' old form) still resolves: the loop
    reads that node from the config itself."""
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path / "cache"))
    register_resolvers()
    cfg = OmegaConf.create(
        {
            "selflock_agent_loop": {"max_turns": 8, "simulator": {"base_url": "${oc.env:SIM_URL_T,'http://h:1/v1'}", "model": "m"}},
            "other": {"max_turns": 6},
            "path": "${selflock.agent_loop_yaml:${selflock_agent_loop}}",
            "elsewhere": "${selflock.agent_loop_yaml:${other}}",
        }
    )
    assert cfg.path == agent_loop_yaml()
    with pytest.raises(Exception, match=r"no longer takes knobs.*selflock_agent_loop: \{max_turns: 6\}"):
        _ = cfg.elsewhere


def test_agent_loop_yaml_resolver_refuses_knobs_with_the_replacement():
    with pytest.raises(ValueError, match="no longer takes knobs") as caught:
        agent_loop_yaml("max_turn_tokens=48", "simulator={base_url: 'http://localhost:8000/v1', model: m}", "t3.k=2")
    message = str(caught.value)
    assert "selflock_agent_loop: {max_turn_tokens: 48, simulator: {base_url: 'http://localhost:8000/v1', model: m}, " \
        "t3: {k: 2}}" in message
    assert ("++selflock_agent_loop.max_turn_tokens=48 ++selflock_agent_loop.simulator.base_url=http://localhost:8000/v1 "
            "++selflock_agent_loop.simulator.model=m ++selflock_agent_loop.t3.k=2") in message
    assert "\n" not in message
    # A misspelt knob or a bad value is named first, as before.
    with pytest.raises(ValueError, match="max_turn_tokenz.*did you mean 'max_turn_tokens'"):
        agent_loop_yaml("max_turn_tokenz=48")
    with pytest.raises(ValueError, match="simulator.base_url"):
        agent_loop_yaml("simulator={base_url: localhost, model: m}")
    with pytest.raises(ValueError, match="takes no argument"):
        agent_loop_yaml("t3")
