"""The names under which we plug into veRL, and the ones a dataset row or a config refers to."""

from __future__ import annotations

AGENT_NAME = "active_reasoning"
"""Our agent loop (``agent_name`` of every row our builders write, ``rollout.agent.default_agent_loop``)."""
REWARD_MANAGER_NAME = "active_reasoning"
"""Our reward manager (``reward.reward_manager.name``)."""
TRAINER_MODE = "selflock"
"""Our v1 trainer mode (``trainer.v1.trainer_mode``): veRL's sync trainer plus the AREW bonus / IGPO."""
SELFLOCK_ESTIMATORS = ("arew", "igpo")
"""``algorithm.adv_estimator`` values that need :data:`TRAINER_MODE`."""
