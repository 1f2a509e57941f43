"""The README's main job: veRL's real `main_ppo` trains PE-G with AREW on CPU (and IGPO + T3 too).

Slow by nature (minutes): two real runs of `python -m verl.trainer.main_ppo` with Ray, FSDP2 on
gloo, our HF rollout server, the `active_reasoning` agent loop, our reward manager and the
`selflock` trainer mode, on SmolLM2-135M-Instruct and a PE-G set built by our builder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "recipes" / "pe_g"

pytestmark = pytest.mark.slow


def _run_main_ppo(workdir: Path, name: str, overrides: list[str], steps: int) -> tuple[list[dict], Path]:
    metrics_path = workdir / f"{name}.jsonl"
    ckpt_dir = workdir / "ckpt" / name
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_FILE_LOGGER_PATH": str(metrics_path), "RAY_DEDUP_LOGS": "0"}
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo",
        f"--config-path={RECIPE_DIR}", "--config-name=cpu_smoke",
        f"trainer.experiment_name={name}", f"trainer.default_local_dir={ckpt_dir}",
        *overrides,
    ]
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1500, check=False)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    # our trainer mode tells the user where the outputs went
    assert f"[verl-selflock] finished {steps} training steps" in text and str(metrics_path) in text
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return steps, ckpt_dir


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).float() for k, v in state.items()}


def _start_model() -> str:
    """The recipe's policy: SmolLM2 warm-started on expert demonstrations (built once and cached by the
    first run of the main job)."""
    from omegaconf import OmegaConf

    from verl_selflock.verl_adapter.resolvers import register_resolvers

    register_resolvers()
    return str(OmegaConf.load(RECIPE_DIR / "cpu_smoke.yaml").actor_rollout_ref.model.path)


def test_arew_and_igpo_with_t3_train_on_cpu(tmp_path):
    # 1. The README's main job as it is (AREW, zero-sum, on a GAE base, from the warm-started model), cut
    # to 1 step to keep the suite within CI's budget, checkpoint at the end. Step 1 must show AREW at
    # work: the embedded default's targets (valid turns, trajectories with critiques of both signs).
    arew_steps, ckpt = _run_main_ppo(tmp_path, "arew", ["trainer.total_training_steps=1", "trainer.save_freq=1"], steps=1)
    assert [s["step"] for s in arew_steps] == [1]
    first_arew = arew_steps[0]["data"]
    assert first_arew["selflock/invalid_ratio"] <= 0.3, first_arew["selflock/invalid_ratio"]
    assert first_arew["arew/frac_traj_both"] >= 0.3, first_arew["arew/frac_traj_both"]
    for step in arew_steps:
        m = step["data"]
        assert m["arew/active"] == 1.0
        assert m["arew/samples_without_critique"] == 0.0
        assert m["arew/pos_turns"] + m["arew/neg_turns"] > 0  # critiques reached the estimator
        assert m["arew/as_pos"] + m["arew/as_neg"] > 0
        assert m["arew/bonus_abs_mean"] > 0  # advantages differ from the base estimator's
        assert m["training/num_turns/mean"] > 2  # multi-turn: assistant and user turns alternate
        assert m["critic/vf_loss"] == m["critic/vf_loss"]  # a critic was trained (NaN-free)
        # Self-locking diagnostics of the trainer mode (every step, not only validation).
        assert 0.0 <= m["selflock/as_proxy"] <= 1.0 and m["selflock/turns"] >= 1
        assert m["selflock/self_locking"] == 0.0  # the monitor's window (10 steps) is not full
        assert not any(key.startswith("t3/") for key in m)  # T3 is off in this run: no t3/* at all

    # 2. The actor and the critic were updated: their weights moved away from the initial model.
    from safetensors.torch import load_file

    initial = load_file(os.path.join(_start_model(), "model.safetensors"))
    probe = "model.layers.0.self_attn.q_proj.weight"
    actor = _weights(ckpt / "global_step_1" / "actor" / "model_world_size_1_rank_0.pt")
    critic = _weights(ckpt / "global_step_1" / "critic" / "model_world_size_1_rank_0.pt")
    assert not torch.equal(actor[probe], initial[probe].float())
    assert not torch.equal(critic[probe], initial[probe].float())
    assert "score.weight" in critic  # the value head
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"

    # 3. IGPO (GRPO-style: 2 rollouts per prompt, no critic) with T3 on, 1 step. The run's 4-turn episodes
    # have one Update round, so T3 uses k = 1; delta_min = 1.0 (a cosine gain never exceeds 1 for
    # non-negative vectors, an invalid guess makes no progress) cuts every episode that reaches its Update
    # round after it, so the T3 path and metrics are exercised for sure. The reference gives an episode that
    # stops without answering the outcome only; `unfinished=score` scores the cut rows too, so the actor's
    # teacher-forced scoring of every turn prefix runs for sure (4 episodes, 2 prefixes each).
    igpo_steps, _ = _run_main_ppo(
        tmp_path,
        "igpo_t3",
        [
            "algorithm.adv_estimator=igpo",
            "+algorithm.igpo.unfinished=score",
            "actor_rollout_ref.rollout.n=2",
            "critic.enable=false",
            # T3 on top of cpu_smoke's selflock_agent_loop knobs (every agent-loop worker reads that node).
            "++selflock_agent_loop.t3={enabled: true, k: 1, delta_min: 1.0}",
            "trainer.total_training_steps=1",
            "trainer.save_freq=-1",
        ],
        steps=1,
    )
    first = igpo_steps[0]["data"]
    assert not any(key.startswith("arew/") for key in first)  # AREW only where it was asked for
    assert "critic/vf_loss" not in first
    igpo = {key: value for key, value in first.items() if key.startswith("igpo/")}
    assert all(math.isfinite(value) for value in igpo.values()), igpo
    assert igpo["igpo/scored_sequences"] >= 4 and igpo["igpo/scoring_time_s"] > 0
    assert igpo["igpo/packed"] == 1.0  # the actor worker's packed forward scored them (the FSDP default)
    assert 0 < igpo["igpo/p_mean"] < 1 and igpo["igpo/frac_rows_outcome_only"] == 0.0
    assert igpo["igpo/adv_abs_mean"] > 0 and igpo["igpo/scoring_time_ratio_to_gen"] > 0
    t3 = {key: value for key, value in first.items() if key.startswith("t3/")}
    assert set(t3) == {
        "t3/frac_truncated", "t3/turn_mean", "t3/tokens_budget_saved_mean", "t3/tokens_budget_saved_total"
    }
    assert all(math.isfinite(value) for value in t3.values()), t3
    assert t3["t3/frac_truncated"] > 0 and t3["t3/tokens_budget_saved_total"] > 0 and t3["t3/turn_mean"] == 2.0
    assert first["actor/pg_loss"] == first["actor/pg_loss"]  # the actor was updated (NaN-free)
    # Where neither method acts, the two runs agree: same data, same initial weights, seeded rollout.
    same = ["prompt_length/mean"]
    for key in same:
        assert first[key] == arew_steps[0]["data"][key], key
