#!/usr/bin/env bash
# GRPO smoke run of veRL's own trainer on CPU with the verl-selflock CPU backend:
# SmolLM2-135M-Instruct, a toy addition dataset, 2 steps. Measured on a shared 2-core / 24 GiB
# machine: exit 0 in ~3.5 min wall (step 1 ~68 s incl. warm-up, step 2 ~33 s).
#
# usage: examples/cpu_grpo_smoke.sh [WORKDIR] [extra Hydra overrides...]
set -euo pipefail
WORKDIR=${1:-/tmp/verl_selflock_cpu_smoke}; shift || true
PYTHON=${PYTHON:-python}
mkdir -p "$WORKDIR"

"$PYTHON" - "$WORKDIR" <<'PY'
import random, sys
from pathlib import Path
import pandas as pd

out = Path(sys.argv[1]); random.seed(0)
def rows(n, split):
    data = []
    for i in range(n):
        a, b = random.randint(1, 20), random.randint(1, 20)
        data.append({
            "data_source": "toy_add",
            "prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}],
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": split, "index": i},
        })
    return pd.DataFrame(data)
rows(32, "train").to_parquet(out / "train.parquet")
rows(8, "val").to_parquet(out / "val.parquet")
(out / "reward.py").write_text(
    "def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):\n"
    "    return 1.0 if ground_truth in solution_str else 0.0\n"
)
PY

MODEL=$("$PYTHON" -c "from verl_selflock.models import smollm2_path; print(smollm2_path())")
read -r -a CPU_OVERRIDES <<< "$("$PYTHON" -c "from verl_selflock.verl_adapter.cpu import cpu_overrides; print(' '.join(cpu_overrides()))")"

VERL_PLATFORM=cpu "$PYTHON" -m verl.trainer.main_ppo "${CPU_OVERRIDES[@]}" \
  data.train_files="$WORKDIR/train.parquet" data.val_files="$WORKDIR/val.parquet" \
  data.train_batch_size=4 data.max_prompt_length=64 data.max_response_length=128 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.ppo_mini_batch_size=4 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.n=2 algorithm.adv_estimator=grpo \
  reward.custom_reward_function.path="$WORKDIR/reward.py" \
  'trainer.logger=[console]' trainer.project_name=verl_selflock_cpu trainer.experiment_name=grpo_smoke \
  trainer.total_training_steps=2 trainer.val_before_train=false trainer.test_freq=-1 trainer.save_freq=-1 \
  "$@"
