"""Driver-side checks of what a run of ours reads from disk: the dataset files and the agent-loop YAML.

veRL opens ``data.train_files`` / ``data.val_files`` and the agent-loop YAML only inside Ray actors,
35-50 s after start-up, and some mistakes there surface as messages that do not say what is wrong (a
misspelt agent-loop knob reaches ``AgentLoopBase.__init__`` as an unexpected keyword argument in a
worker). :func:`check_selflock_inputs` runs in the driver's ``validate_config`` (through
:func:`verl_selflock.verl_adapter.config_validation.validate_selflock_config`), before Ray starts, and
only for configs that use our agent loop, reward manager or estimators: a plain veRL run is untouched.

It reads parquet *footers* (row count and schema) and, where a file has one, its ``agent_name`` column:
rows played by ``active_reasoning`` need an environment spec (``extra_info.env``), rows played by
``tool_agent_arew`` do not (the run's tool-agent settings are checked by
:mod:`verl_selflock.verl_adapter.tool_agent_checks`). No other column is read. Paths written with our
``${selflock.*}`` resolvers are resolved here as veRL resolves them later (``OmegaConf.resolve`` in the
TaskRunner); the resolvers build their output once under a file lock and return the cached folder on
every later call, so the TaskRunner's resolution finds the work done instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from verl_selflock.contracts.names import AGENT_NAME, REWARD_MANAGER_NAME, SELFLOCK_ESTIMATORS
from verl_selflock.tools.loop_config import TOOL_AGENT_NAME

__all__ = [
    "AGENT_LOOP_KEY",
    "AGENT_LOOP_TARGET",
    "DATA_KEYS",
    "DataCheckError",
    "check_loop_knobs",
    "check_selflock_inputs",
    "load_loop_yaml",
    "selflock_reasons",
]

AGENT_LOOP_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
DEFAULT_LOOP_KEY = "actor_rollout_ref.rollout.agent.default_agent_loop"
DATA_KEYS = ("data.train_files", "data.val_files")
OUR_LOOPS = (AGENT_NAME, TOOL_AGENT_NAME)
"""Our agent loops: a run whose rows default to one of them needs no ``agent_name`` column."""
AGENT_LOOP_TARGET = "verl_selflock.verl_adapter.agent_loop.ActiveReasoningAgentLoop"
"""``_target_`` of our loop in an agent-loop YAML (a string: importing the loop would import veRL's
agent-loop stack on the driver just to read its name; a test checks it matches the class)."""
ENTRY_KEYS = ("name", "_target_")
"""Keys of an agent-loop YAML entry that veRL reads itself (Hydra's ``_recursive_`` etc. pass too)."""
BUILD_HINT = "build it with `verl-selflock data <task> --out <folder>` (see the task's recipe README)"
READABLE_SUFFIXES = (".parquet", ".json", ".jsonl")
"""What veRL's ``RLHFDataset`` reads (``_read_files_and_tokenize``); anything else fails there."""


class DataCheckError(ValueError):
    """Base of the errors raised here; :mod:`config_validation` re-raises them as its own error type."""


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    """``config[dotted]``, resolving interpolations on the way, as veRL will (``default`` when absent)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.get(key) if hasattr(node, "get") else None
        if node is None:
            return default
    if not hasattr(node, "get"):
        return default
    if OmegaConf.is_config(node) and OmegaConf.is_missing(node, leaf):
        raise DataCheckError(f"{dotted} is not set (???): pass {dotted}=<path> on the command line")
    try:
        value = node.get(leaf)
    except OmegaConfBaseException as err:  # a resolver failed: its message is the useful part
        # OmegaConf appends "full_key: ... object_type=..." lines: keep the resolver's own error, one line.
        original = err.__cause__ or err.__context__
        cause = _one_line(original) if original else str(err).splitlines()[0]
        message = f"{dotted} could not be resolved: {cause}"
        if isinstance(original, TypeError) and "unexpected keyword argument" in str(original):
            # ${selflock.agent_loop_yaml:'max_turn_token=40'}: the resolver builds the loop's knobs.
            message += f"; known {AGENT_NAME} agent-loop knobs: {_known_knobs()}"
        raise DataCheckError(message) from err
    return default if value is None else value


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line (YAML and Arrow errors span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def selflock_reasons(config: Any) -> list[str]:
    """The settings that make ``config`` a run of ours, read from the config alone (no file opened).

    An agent-loop YAML that declares our loop is one more reason, found by :func:`check_selflock_inputs`.
    """
    reasons = []
    estimator = str(_get(config, "algorithm.adv_estimator", ""))
    if estimator in SELFLOCK_ESTIMATORS:
        reasons.append(f"algorithm.adv_estimator={estimator}")
    if str(_get(config, "reward.reward_manager.name", "")) == REWARD_MANAGER_NAME:
        reasons.append(f"reward.reward_manager.name={REWARD_MANAGER_NAME}")
    default_loop = str(_get(config, DEFAULT_LOOP_KEY, ""))
    if default_loop in OUR_LOOPS:
        reasons.append(f"{DEFAULT_LOOP_KEY}={default_loop}")
    return reasons


def check_loop_knobs(entry: Mapping[str, Any], where: str) -> None:
    """Check the knobs of one ``active_reasoning`` agent-loop YAML entry (names, then values).

    Args:
        entry: the entry as plain Python (``name``, ``_target_`` and the knobs).
        where: what to name in the message (the config key and the file).

    Raises:
        DataCheckError: naming the bad knob, a close match if there is one, and the known knobs.
    """
    from verl_selflock.verl_adapter.agent_loop_config import ActiveReasoningLoopConfig

    known = _known_knobs()
    knobs = {
        str(key): value
        for key, value in entry.items()
        if key not in ENTRY_KEYS and not (str(key).startswith("_") and str(key).endswith("_"))
    }
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        guesses = [match for key in unknown for match in difflib.get_close_matches(key, known, n=1)]
        hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
        raise DataCheckError(f"{where}: unknown {AGENT_NAME} agent-loop knob(s) {unknown}{hint}; known knobs: {known}")
    try:
        ActiveReasoningLoopConfig(**knobs)
    except (TypeError, ValueError) as err:
        raise DataCheckError(f"{where}: {err}") from err


def _known_knobs() -> list[str]:
    from verl_selflock.verl_adapter.agent_loop_config import ActiveReasoningLoopConfig

    return [field.name for field in dataclasses.fields(ActiveReasoningLoopConfig)]


def _is_ours(entry: Any) -> bool:
    return isinstance(entry, Mapping) and str(entry.get("_target_", "")) == AGENT_LOOP_TARGET


def load_loop_yaml(path: str, strict: bool) -> list[Any]:
    """The entries of an agent-loop YAML as plain Python, found as veRL finds it (``resolve_config_path``).

    Args:
        path: ``rollout.agent.agent_loop_config_path`` as resolved.
        strict: raise :class:`DataCheckError` on a missing or unusable file (a run of ours); else return [].
    """
    from omegaconf import OmegaConf
    from verl.utils.import_utils import resolve_config_path

    where = f"{AGENT_LOOP_KEY}={path}"
    try:
        resolved = resolve_config_path(path)
        entries = OmegaConf.to_container(OmegaConf.load(resolved), resolve=True)
    except FileNotFoundError:
        if strict:
            raise DataCheckError(
                f"{where}: no such file (veRL looks in the working directory {os.getcwd()} and beside its own "
                "package); give an absolute path, or use ${selflock.agent_loop_yaml:...} as the recipes do"
            ) from None
        return []
    except Exception as err:  # a YAML or interpolation error: the file is the user's to fix
        if strict:
            raise DataCheckError(f"{where}: not a readable agent-loop YAML ({_one_line(err)})") from err
        return []
    if not isinstance(entries, list):
        if strict:
            raise DataCheckError(
                f"{where}: an agent-loop YAML is a list of entries (- name: {AGENT_NAME}, _target_: ...), "
                f"got a {type(entries).__name__}"
            )
        return []
    return entries


def check_selflock_inputs(config: Any) -> None:
    """Check the agent-loop YAML and the dataset files of a run that uses our components.

    A run is ours when :func:`selflock_reasons` finds a reason or its agent-loop YAML declares our loop
    (``_target_`` :data:`AGENT_LOOP_TARGET`); any other run is left to veRL, whatever its files hold.

    Args:
        config: the full veRL config (unresolved, as ``main_ppo`` hands it to ``validate_config``).

    Raises:
        DataCheckError: one line naming the config key, the file and what to change.
    """
    reasons = selflock_reasons(config)
    entries: list[Any] = []
    loop_path = ""
    if reasons:
        loop_path = str(_get(config, AGENT_LOOP_KEY, ""))
        entries = load_loop_yaml(loop_path, strict=True) if loop_path else []
    else:
        try:  # a plain run: only peek, and leave every problem of its YAML to veRL
            loop_path = str(_get(config, AGENT_LOOP_KEY, ""))
            entries = load_loop_yaml(loop_path, strict=False) if loop_path else []
        except DataCheckError:
            return
    ours = [entry for entry in entries if _is_ours(entry)]
    if ours and not reasons:
        reasons.append(f"{AGENT_LOOP_KEY} declares the {AGENT_NAME} agent loop")
    if not reasons:
        return
    try:
        rollout = str(_get(config, "actor_rollout_ref.rollout.name", ""))
    except DataCheckError:  # not set: veRL's own validation names it
        rollout = ""
    for entry in ours:
        check_loop_knobs(entry, f"{AGENT_LOOP_KEY}={loop_path}")
        if rollout == "sglang" and bool(entry.get("stop_on_closing_tag", False)):
            # veRL runs SGLang with skip_tokenizer_init, so stop strings never match there, and SGLang
            # rejects vLLM's include_stop_str_in_output; our token-level cut is the authority anyway.
            raise DataCheckError(
                f"{AGENT_LOOP_KEY}={loop_path}: stop_on_closing_tag=true needs a rollout that matches stop "
                "strings (vLLM, our CPU 'hf'); actor_rollout_ref.rollout.name=sglang does not: set "
                "stop_on_closing_tag=false (turns are still cut at the first closing tag)"
            )

    because = f" (checked before training because {reasons[0]})"
    default_loop = str(_get(config, DEFAULT_LOOP_KEY, ""))
    prompt_key = str(_get(config, "data.prompt_key", "prompt"))
    checked: set[str] = set()
    for key in DATA_KEYS:
        for path in _data_paths(config, key):
            if path not in checked:  # train and val may name the same file: read its footer once
                _check_data_file(key, path, prompt_key, default_loop, because)
                checked.add(path)


def _data_paths(config: Any, key: str) -> Iterator[str]:
    value = _get(config, key)
    if value is None:
        if key == "data.train_files":
            raise DataCheckError(f"{key} is not set: pass {key}=<folder>/<split>.parquet")
        return  # no validation set: veRL skips validation
    paths = [value] if isinstance(value, str) else list(value)
    if not paths:
        raise DataCheckError(f"{key} lists no file: pass {key}=<folder>/<split>.parquet")
    for path in paths:
        if "://" not in str(path):  # remote (hdfs://, s3://...): veRL copies it in the TaskRunner
            yield str(path)


def _check_data_file(key: str, path: str, prompt_key: str, default_loop: str, because: str) -> None:
    where = f"{key}: {path}"
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        relative = "" if os.path.isabs(local) else f" (relative to the working directory {os.getcwd()})"
        raise DataCheckError(f"{where} does not exist{relative}; {BUILD_HINT}, or fix {key}{because}")
    if os.path.isdir(local):
        names = ("train.parquet", "test.parquet") if key == "data.train_files" else ("test.parquet", "train.parquet")
        inside = [name for name in names if os.path.isfile(os.path.join(local, name))]
        hint = f"e.g. {key}={os.path.join(path, inside[0])}" if inside else f"point {key} at a .parquet file in it"
        raise DataCheckError(f"{where} is a folder, not a data file: {hint}{because}")
    suffix = os.path.splitext(local)[1].lower()
    if suffix not in READABLE_SUFFIXES:
        raise DataCheckError(
            f"{where}: veRL reads {list(READABLE_SUFFIXES)} data files only (by suffix), got {suffix or 'no suffix'!r}"
            f"{because}"
        )
    if suffix != ".parquet":
        if os.path.getsize(local) == 0:
            raise DataCheckError(f"{where} is empty; {BUILD_HINT}{because}")
        return  # JSON has no footer to read cheaply: veRL checks its rows
    _check_parquet(where, local, prompt_key, default_loop, because)


def _check_parquet(where: str, path: str, prompt_key: str, default_loop: str, because: str) -> None:
    """Row count, columns and column types of one parquet file (``default_loop``: the run's
    ``rollout.agent.default_agent_loop``, which plays rows without an ``agent_name``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)  # reads the footer only
        num_rows, schema = meta.metadata.num_rows, meta.schema_arrow
        loops = _loops_of(meta, schema, default_loop)  # and the agent_name column, if any
    except Exception as err:  # ArrowInvalid, OSError, ...: the file is unusable either way
        raise DataCheckError(
            f"{where} is not a readable parquet file ({_one_line(err)}); {BUILD_HINT}{because}"
        ) from err
    if num_rows == 0:
        raise DataCheckError(f"{where} has no rows; {BUILD_HINT} with a positive row count{because}")

    # Only active_reasoning rows are built from an environment spec (extra_info.env); a run may mix loops.
    plays_ours = AGENT_NAME in loops
    required = [prompt_key, "data_source", "reward_model"] + (["extra_info"] if plays_ours else [])
    required += [] if default_loop in OUR_LOOPS else ["agent_name"]
    missing = [column for column in required if column not in schema.names]
    if missing:
        hint = BUILD_HINT
        if "agent_name" in missing:
            hint += (
                f", or set {DEFAULT_LOOP_KEY}={AGENT_NAME} (or {TOOL_AGENT_NAME}; rows without agent_name run "
                "veRL's default loop)"
            )
        raise DataCheckError(
            f"{where} lacks column(s) {missing} that our agent loop and reward manager read (it has "
            f"{schema.names}); {hint}{because}"
        )
    prompt_type = schema.field(prompt_key).type
    if not (pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type)):
        raise DataCheckError(
            f"{where}: column {prompt_key!r} must hold chat messages (a list of {{role, content}}), got {prompt_type}; "
            f"{BUILD_HINT}{because}"
        )
    if not plays_ours:
        return
    extra_type = schema.field("extra_info").type
    if not (pa.types.is_struct(extra_type) and extra_type.get_field_index("env") >= 0):
        raise DataCheckError(
            f"{where}: column 'extra_info' has no 'env' field (the environment spec each {AGENT_NAME} episode is built from; "
            f"extra_info is {extra_type}); {BUILD_HINT}{because}"
        )


def _loops_of(meta: Any, schema: Any, default_loop: str) -> set[str]:
    """The agent loops that play a parquet file's rows: its ``agent_name`` values (reading that column
    only), ``default_loop`` for rows without one (no column, or null)."""
    import pyarrow.compute as pc

    if "agent_name" not in schema.names:
        return {default_loop}
    names = pc.unique(meta.read(columns=["agent_name"]).column("agent_name")).to_pylist()
    return {default_loop if name is None else str(name) for name in names}
