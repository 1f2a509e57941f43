"""AREW on veRL's own tool agent: `recipes/tool_agent/cpu_smoke.yaml` trains 2 steps on CPU.

Slow by nature (minutes): a real `python -m verl.trainer.main_ppo` with Ray, FSDP2 on gloo, our HF rollout,
the `tool_agent_arew` loop (veRL's ToolAgentLoop + critiques from the tool calls), the calculator tool,
veRL's naive reward manager with the task's score, GRPO + the AREW bonus, and SmolLM2-135M-Instruct.
What the model does is not scripted: at temperature 1.0 it calls the calculator in some episodes (well or
badly) and answers straight away in others, so the critiques carry both signs within two steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "recipes" / "tool_agent"

pytestmark = pytest.mark.slow


def test_tool_agent_arew_trains_on_cpu(tmp_path, smollm2_dir):
    metrics_path = tmp_path / "tool_agent.jsonl"
    # RAY_ADDRESS=local: a fresh Ray instance even where another run's cluster is up on the machine.
    env = {
        **os.environ,
        "VERL_PLATFORM": "cpu",
        "VERL_FILE_LOGGER_PATH": str(metrics_path),
        "RAY_DEDUP_LOGS": "0",
        "RAY_ADDRESS": "local",
    }
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={RECIPE_DIR}", "--config-name=cpu_smoke"]
    log = tmp_path / "tool_agent.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, check=False, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    assert "[verl-selflock] finished 2 training steps" in text

    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    assert [step["step"] for step in steps] == [1, 2]
    for step in steps:
        m = step["data"]
        assert m["arew/active"] == 1.0 and m["arew/samples_without_critique"] == 0.0
        # Tool-use diagnostics every step, from the loop's per-episode counts.
        tool = {key: value for key, value in m.items() if key.startswith("tool/")}
        assert {"tool/calls_per_episode", "tool/episodes_with_call", "tool/turns", "tool/self_locking"} <= set(tool)
        assert all(math.isfinite(value) for value in tool.values()), tool
        assert tool["tool/self_locking"] == 0.0  # the monitor's window (10 steps) is not full
        assert m["actor/pg_loss"] == m["actor/pg_loss"]  # the actor was updated (NaN-free)
    # Critiques of both signs reached the advantage (means per trajectory, summed over the two steps).
    total = {key: sum(step["data"][key] for step in steps) for key in ("arew/pos_turns", "arew/neg_turns")}
    assert total["arew/pos_turns"] > 0 and total["arew/neg_turns"] > 0, total
    assert any(step["data"]["arew/bonus_abs_mean"] > 0 for step in steps)
    assert sum(step["data"]["tool/calls_per_episode"] for step in steps) > 0
