"""Start-up validation of a veRL config that uses our components (runs on the driver, before Ray).

veRL does not validate ``algorithm.adv_estimator`` until the first advantage step inside the
TaskRunner, and it silently drops the critic unless the estimator is literally ``gae``. A run that
asks for ``arew`` without the data AREW needs must not train silently without critiques: every such
misconfiguration fails here with a message that says exactly what to set. The files such a run reads
(datasets, agent-loop YAML) are checked here too (:mod:`verl_selflock.verl_adapter.data_checks`).

The agent loop's knobs (the top-level ``selflock_agent_loop`` node) are checked and *pinned* here: the
node is resolved in the driver's environment and its plain values written back into the config that
``main_ppo`` then ships to Ray (:func:`pin_agent_loop_knobs`). Otherwise veRL resolves it in the
TaskRunner, wherever Ray placed it, and a recipe's ``${oc.env:SELFLOCK_SIMULATOR_BASE_URL,...}`` would
read that process's environment instead of the shell the user launched from. The ``tool_agent_arew`` loop's
node, ``selflock_tool_agent``, is pinned the same way (:func:`pin_tool_agent_knobs`), and a run that uses that
loop gets its checks here too (:mod:`verl_selflock.verl_adapter.tool_agent_checks`): this module is the one
validation entry point (veRL's ``validate_config`` and our trainer mode call :func:`validate_selflock_config`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from verl_selflock.algorithms.arew import ArewConfig
from verl_selflock.algorithms.arew_config import BUILTIN_BASES
from verl_selflock.algorithms.igpo_config import IgpoConfig, resolve_scoring_mode
from verl_selflock.contracts.names import SELFLOCK_ESTIMATORS, TRAINER_MODE
from verl_selflock.errors import UserError
from verl_selflock.tools.loop_config import TOOL_CONFIG_KEY
from verl_selflock.verl_adapter.data_checks import DataCheckError, check_loop_knobs, check_selflock_inputs
from verl_selflock.verl_adapter.tool_agent_checks import check_tool_agent_run, check_tool_knobs, uses_tool_agent

logger = logging.getLogger(__name__)
CONFIG_KEY = "selflock_agent_loop"
"""= ``agent_loop_config.CONFIG_KEY`` (not imported: this module loads in every process, at ``import verl``)."""


class SelflockConfigError(UserError, ValueError):
    """A veRL config asks for one of our features with settings (or files) that cannot work."""


def _get(node: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key) if hasattr(node, "get") else None  # dict or OmegaConf DictConfig
    return default if node is None else node


def uses_selflock_estimator(config: Any) -> bool:
    return str(_get(config, "algorithm.adv_estimator", "")) in SELFLOCK_ESTIMATORS


def arew_config_of(config: Any) -> ArewConfig:
    """The validated ``algorithm.arew`` node of a full veRL config (defaults if absent)."""
    return ArewConfig.from_mapping(_get(config, "algorithm.arew"))


def igpo_config_of(config: Any) -> IgpoConfig:
    """The validated ``algorithm.igpo`` node of a full veRL config (defaults if absent)."""
    return IgpoConfig.from_mapping(_get(config, "algorithm.igpo"))


def igpo_scoring_mode_of(config: Any) -> str:
    """``packed`` or ``prefix``: how IGPO's scores are computed with this config (``algorithm.igpo.scoring``
    resolved against the actor's engine; raises ValueError where ``packed`` cannot run)."""
    return resolve_scoring_mode(
        igpo_config_of(config).scoring,
        str(_get(config, "actor_rollout_ref.actor.strategy", "fsdp")),
        bool(_get(config, "actor_rollout_ref.model.use_fused_kernels", False)),
    )


def validate_selflock_config(config: Any) -> None:
    """Raise :class:`SelflockConfigError` if ``config`` asks for our components with settings or files
    that cannot work.

    Settings come first (they open no file and resolve nothing expensive); then, for runs that use
    ``tool_agent_arew``, its knobs and tool config
    (:func:`~verl_selflock.verl_adapter.tool_agent_checks.check_tool_agent_run`); then, for runs that use
    our agent loops, reward manager or estimators, the agent-loop YAML and the dataset files
    (:func:`~verl_selflock.verl_adapter.data_checks.check_selflock_inputs`).

    Args:
        config: the full veRL PPO config (``ppo_trainer.yaml`` after Hydra overrides), unresolved; its
            ``selflock_agent_loop`` and ``selflock_tool_agent`` nodes come back resolved
            (:func:`pin_agent_loop_knobs`, :func:`pin_tool_agent_knobs`).
    """
    pin_agent_loop_knobs(config)
    tool_knobs = pin_tool_agent_knobs(config)
    _check_settings(config)
    try:
        if uses_tool_agent(config):
            check_tool_agent_run(config, tool_knobs)
        check_selflock_inputs(config)
    except DataCheckError as err:
        raise SelflockConfigError(str(err)) from None


def _check_settings(config: Any) -> None:
    if str(_get(config, "actor_rollout_ref.rollout.name", "")) == "hf":  # = cpu.selection.ROLLOUT_NAME
        from verl_selflock.verl_adapter.cpu.engine_options import check_hf_engine_options

        try:
            check_hf_engine_options(_get(config, "actor_rollout_ref.rollout.engine_kwargs.hf") or {})
        except ValueError as err:
            raise SelflockConfigError(str(err)) from None
    diagnostics = _get(config, "selflock_diagnostics")
    if diagnostics is not None:
        from verl_selflock.diagnostics.monitor import MonitorConfig

        try:
            MonitorConfig.from_mapping(diagnostics)
        except (TypeError, ValueError) as err:
            raise SelflockConfigError(str(err)) from None

    estimator = str(_get(config, "algorithm.adv_estimator", ""))
    has_arew_node = _get(config, "algorithm.arew") is not None
    if estimator not in SELFLOCK_ESTIMATORS:
        # Not an error (a recipe may keep a node for an A/B run), but worth validating.
        if has_arew_node:
            arew_config_of(config)
        if _get(config, "algorithm.igpo") is not None:
            igpo_config_of(config)
        return

    try:
        arew = arew_config_of(config)
        igpo_config_of(config)
        if estimator == "igpo":
            igpo_scoring_mode_of(config)
        if estimator == "arew" and arew.base not in BUILTIN_BASES:  # built-in names need no veRL import
            from verl_selflock.verl_adapter.private_names import adv_estimator_registry

            arew.validate_base(adv_estimator_registry())
    except ValueError as err:
        raise SelflockConfigError(str(err)) from None

    if not bool(_get(config, "trainer.use_v1", True)):
        raise SelflockConfigError(
            f"algorithm.adv_estimator={estimator} runs on veRL's v1 trainer only: set trainer.use_v1=true "
            f"trainer.v1.trainer_mode={TRAINER_MODE}"
        )
    mode = _get(config, "trainer.v1.trainer_mode", "sync")
    if mode != TRAINER_MODE:
        raise SelflockConfigError(
            f"algorithm.adv_estimator={estimator} needs the per-turn critiques that only our trainer mode "
            f"passes to the advantage step: set trainer.v1.trainer_mode={TRAINER_MODE} (got {mode!r})"
        )
    if estimator == "igpo" and bool(_get(config, "algorithm.use_kl_in_reward", False)):
        raise SelflockConfigError(
            "algorithm.adv_estimator=igpo builds its turn rewards from the outcome score and the information "
            "gain only: set algorithm.use_kl_in_reward=false (use actor_rollout_ref.actor.use_kl_loss for a KL term)"
        )
    rollout_n = _get(config, "actor_rollout_ref.rollout.n", 1)
    if estimator == "igpo" and int(rollout_n) < 2:
        # A prompt group of one trajectory z-scores the outcome against itself: exactly 0 under
        # norm_mode=separate, and under joint the first turn's return (the sum of the row's centred
        # rewards) is 0, so the outcome would silently drop out of training.
        raise SelflockConfigError(
            "algorithm.adv_estimator=igpo normalises rewards within each prompt's group of rollouts: set "
            f"actor_rollout_ref.rollout.n to 2 or more (got actor_rollout_ref.rollout.n={rollout_n})"
        )
    correction = _get(config, "algorithm.rollout_correction")
    corrects = correction is not None and any(_get(correction, key) is not None for key in ("rollout_is", "rollout_rs"))
    if estimator == "igpo" and corrects and not bool(_get(correction, "bypass_mode", False)):
        # veRL applies IS weights and rejection sampling inside the advantage step (trainer_base.py, 0.9.1,
        # PPOTrainer._compute_advantage, step 2) that IGPO replaces: they would silently not happen.
        raise SelflockConfigError(
            "algorithm.adv_estimator=igpo replaces veRL's advantage step, where veRL applies "
            "algorithm.rollout_correction in its default (decoupled) mode: set "
            "algorithm.rollout_correction.bypass_mode=true (the actor's loss then applies the correction), or "
            "rollout_is=null and rollout_rs=null "
            f"(got rollout_is={_get(correction, 'rollout_is')}, rollout_rs={_get(correction, 'rollout_rs')})"
        )
    if estimator == "igpo" and bool(_get(config, "actor_rollout_ref.rollout.enable_rollout_routing_replay", False)):
        # The teacher-forced scoring sequences were never generated by the rollout: no routed experts exist
        # for them, and the actor's replay would fail inside the first step.
        raise SelflockConfigError(
            "algorithm.adv_estimator=igpo scores sequences the rollout never generated, which have no routed "
            "experts to replay: set actor_rollout_ref.rollout.enable_rollout_routing_replay=false"
        )
    critic_enable = _get(config, "critic.enable")
    if estimator == "arew" and arew.base == "gae" and not critic_enable:
        raise SelflockConfigError(
            "algorithm.arew.base=gae needs critic values, and veRL only builds a critic for "
            f"adv_estimator=gae unless told otherwise: set critic.enable=True (got critic.enable={critic_enable})"
        )


def pin_agent_loop_knobs(config: Any) -> dict[str, Any] | None:
    """Resolve ``selflock_agent_loop`` here, check it, and write its plain values back into ``config``.

    Every agent-loop worker, on every node, reads that node from the config it receives, so the values
    must not depend on where the TaskRunner happens to resolve it: ``${oc.env:...}`` is read in the
    driver's environment, here. The API key is not pinned (only the *name* of its variable is in the
    config: veRL prints the whole config); each worker reads the key from its own environment.

    Returns:
        the knobs as plain Python, or None when the config has no such node.
    """
    knobs = _pin_node(config, CONFIG_KEY)
    if knobs is None:
        return None
    try:
        check_loop_knobs(knobs, CONFIG_KEY)
    except DataCheckError as err:
        raise SelflockConfigError(str(err)) from None
    rollout = str(_get(config, "actor_rollout_ref.rollout.name", ""))
    if rollout == "sglang" and knobs.get("stop_on_closing_tag"):
        # veRL runs SGLang with skip_tokenizer_init: stop strings never match there (see data_checks).
        raise SelflockConfigError(
            f"{CONFIG_KEY}.stop_on_closing_tag=true needs a rollout that matches stop strings (vLLM, our CPU 'hf'); "
            "actor_rollout_ref.rollout.name=sglang does not: set it false (turns are still cut at the first closing tag)"
        )
    if knobs.get("simulator"):
        _warn_about_other_nodes(config, knobs["simulator"])
    return knobs


def pin_tool_agent_knobs(config: Any) -> dict[str, Any] | None:
    """:func:`pin_agent_loop_knobs` for the ``tool_agent_arew`` loop's ``selflock_tool_agent`` node: resolved
    here, checked (names and values), written back as plain values.

    Returns:
        the knobs as plain Python, or None when the config has no such node.
    """
    knobs = _pin_node(config, TOOL_CONFIG_KEY)
    if knobs is not None:
        try:
            check_tool_knobs(knobs, TOOL_CONFIG_KEY)
        except DataCheckError as err:
            raise SelflockConfigError(str(err)) from None
    return knobs


def _pin_node(config: Any, key: str) -> dict[str, Any] | None:
    """Resolve the top-level ``key`` node in this (the driver's) process and write its plain values back into
    ``config``; None when the config has no such node."""
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    node = _get(config, key)
    if node is None:
        return None
    try:
        knobs = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err
        raise SelflockConfigError(f"{key} could not be resolved: {' '.join(str(cause).split())}") from None
    if not isinstance(knobs, dict):
        raise SelflockConfigError(f"{key} must be a mapping of agent-loop knobs, got {knobs!r}")
    if OmegaConf.is_config(config):
        with read_write(config), open_dict(config):
            config[key] = knobs
    else:
        config[key] = knobs
    return knobs


def _warn_about_other_nodes(config: Any, simulator: dict[str, Any]) -> None:
    """What the driver can tell about a simulator that workers on other nodes must reach (warnings: a
    per-node simulator on every node's loopback, or keys exported on every node, are legitimate; each
    worker's start-up check refuses what does not work, naming its URL)."""
    from verl_selflock.simulators.preflight import is_loopback

    url = str(simulator.get("base_url", ""))
    nnodes = int(_get(config, "trainer.nnodes", 1) or 1)
    if is_loopback(url) and nnodes > 1:
        logger.warning(
            "%s.simulator.base_url=%s is each node's own loopback and trainer.nnodes=%d: agent-loop workers run on "
            "every node, so each node must serve the simulator there; otherwise use an address every node reaches",
            CONFIG_KEY, url, nnodes,
        )
    key_env = simulator.get("api_key_env")
    remote = _get(config, "ray_kwargs.ray_init.address") or os.environ.get("RAY_ADDRESS")
    if key_env and os.environ.get(str(key_env)) and (remote or nnodes > 1):
        logger.warning(
            "%s.simulator.api_key_env=%s: the key is set here, but each worker reads it from its own environment; "
            "export %s on every node before `ray start` (workers without it are refused by the simulator at start-up)",
            CONFIG_KEY, key_env, key_env,
        )
