"""Build the ``active_reasoning`` agent loop outside a Ray worker, exactly as veRL's AgentLoopWorker does.

For benchmarks, offline rollouts and tests: any object with veRL's ``generate(request_id, prompt_ids,
sampling_params, ...)`` serves as the server (our CPU backend's ``HFGenerationServer``, a scripted one).
"""

from __future__ import annotations

from typing import Any

from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.verl_adapter.private_names import agent_loop_init_kwargs, agent_loop_registry


def build_agent_loop(
    config: Any,
    server_manager: Any,
    tokenizer: Any,
    knobs: dict[str, Any] | None = None,
    hf_model_type: str | None = None,
) -> Any:
    """``hydra.utils.instantiate`` of the registry entry, as ``AgentLoopWorker._run_agent_loop`` does.

    Args:
        config: the full veRL config (``ppo_trainer`` composed).
        server_manager: the generation server the loop calls.
        tokenizer: the policy tokenizer.
        knobs: keys of an agent-loop YAML entry (``max_turn_tokens``, ``t3`` ...), overriding the defaults.
        hf_model_type: the model type that selects veRL's Continuous Token builder (None: the default one).

    Call it inside a running event loop when the loop's constructor needs one (it does not today).
    """
    import hydra
    from omegaconf import OmegaConf

    import verl_selflock.verl_adapter.agent_loop  # noqa: F401  (registers the loop)

    entry = agent_loop_registry()[AGENT_NAME]
    if knobs:
        entry = OmegaConf.create({"name": AGENT_NAME, **dict(entry), **knobs})
    return hydra.utils.instantiate(
        config=entry,
        server_manager=server_manager,
        tokenizer=tokenizer,
        hf_model_type=hf_model_type,
        **agent_loop_init_kwargs(config),
    )
