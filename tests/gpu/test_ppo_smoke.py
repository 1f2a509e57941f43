"""veRL's real PPO loop on one CUDA GPU: vLLM rollout, FSDP2, dynamic batch sizes, 2 TransferQueue storage
units, 2 rollouts per prompt, PE-G with SmolLM2-135M-Instruct; 2 steps of AREW, then 2 of IGPO with each scoring
mode (packed, per prefix).

Each job takes a few minutes (Ray, vLLM and FSDP start-up dominate). The command lines come from
``gpu_smoke_config.py`` beside this file, which a CPU test validates on every run of the suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from gpu_smoke_config import smoke_command

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
STEPS = 2
PROB_DIFF_MEAN_MAX = 0.05
"""Rollout (vLLM) vs actor (FSDP) token-probability difference after a weight sync: bf16 kernels differ,
weights must not (a failed sync gives differences of order 0.1-1 after the first update)."""


def _run(tmp_path: Path, estimator: str, extra: tuple[str, ...] = ()) -> list[dict]:
    pytest.importorskip("vllm", reason="needs veRL's vLLM rollout: pip install -e '.[vllm]'")
    pytest.importorskip("gguf", reason="needs the cpu extra (SmolLM2's GGUF -> HF conversion): pip install -e '.[cpu]'")
    from verl_selflock.models import smollm2_path

    smollm2_path()  # convert once here, not inside the job's Ray actors
    metrics_path = tmp_path / f"{estimator}.jsonl"
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(metrics_path), "RAY_DEDUP_LOGS": "0"}
    env.pop("VERL_PLATFORM", None)  # veRL detects CUDA itself
    log = tmp_path / f"{estimator}.log"
    with open(log, "w") as out:
        proc = subprocess.run(smoke_command(estimator, f"gpu_{estimator}", tmp_path, steps=STEPS, extra=extra), cwd=tmp_path,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False)
    text = log.read_text()
    assert proc.returncode == 0, text[-8000:]
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), text[-4000:]
    return [s["data"] for s in steps]


def _finite(metrics: dict, prefix: str) -> dict:
    found = {k: v for k, v in metrics.items() if k.startswith(prefix)}
    assert found, f"no {prefix}* metric logged"
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in found.values()), found
    return found


def _weight_sync_is_tight(metrics: dict) -> None:
    # veRL compares the rollout's token log-probs with the actor's old log-probs on the same tokens
    # (verl/utils/debug/metrics.py); step 2's rollout ran on the weights synced after step 1's update.
    assert metrics["training/rollout_probs_diff_valid"] == 1
    assert metrics["training/rollout_probs_diff_mean"] < PROB_DIFF_MEAN_MAX, metrics["training/rollout_probs_diff_mean"]


def test_arew_trains_on_gpu_with_vllm(tmp_path):
    steps = _run(tmp_path, "arew")
    for m in steps:
        arew = _finite(m, "arew/")
        _finite(m, "selflock/")
        assert arew["arew/active"] == 1.0 and m["training/num_turns/mean"] > 2
        assert math.isfinite(m["critic/vf_loss"]) and math.isfinite(m["actor/pg_loss"])
    _weight_sync_is_tight(steps[-1])


@pytest.mark.parametrize("scoring", ["packed", "prefix"])
def test_igpo_trains_on_gpu_with_vllm(tmp_path, scoring):
    # packed: our actor worker's tree-mask forward on the FSDP2 module; prefix: veRL's compute_log_prob
    steps = _run(tmp_path, "igpo", (f"+algorithm.igpo.scoring={scoring}",))
    for m in steps:
        assert m["igpo/packed"] == float(scoring == "packed")
        igpo = _finite(m, "igpo/")
        _finite(m, "selflock/")
        assert not any(k.startswith("arew/") for k in m) and "critic/vf_loss" not in m
        assert igpo["igpo/scoring_chunks"] >= 1 and igpo["igpo/rows_over_token_limit"] == 0
        assert igpo["igpo/adv_abs_mean"] > 0 and igpo["igpo/scored_sequences"] > 0 and 0 < igpo["igpo/p_mean"] < 1
    _weight_sync_is_tight(steps[-1])
