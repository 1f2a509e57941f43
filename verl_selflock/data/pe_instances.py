"""PE instances: the dataset configuration, the seeded draw of a table and hidden weights, the environment
spec and the rows of both splits (the parameters and why: :mod:`verl_selflock.data.pe`)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from verl_selflock.data.parquet import dataset_row, split_rows
from verl_selflock.envs.pe.env import DEFAULT_MAX_TURNS, PE_VARIANTS
from verl_selflock.envs.pe.geometry import COS_THRESHOLD, DOMINANCE_TOL
from verl_selflock.envs.pe.prompts import PROMPT_STYLES, pe_messages
from verl_selflock.errors import InvalidInput

__all__ = [
    "GATED_DIM",
    "N_MOVIES",
    "PEDataConfig",
    "pe_data_config",
    "count_informative_queries",
    "sample_pe_instance",
    "make_pe_spec",
    "build_pe_rows",
    "data_source_name",
    "spec_fingerprint",
]

GATED_DIM = 6
N_MOVIES = 10
VALUE_RANGE = 20  # attribute values are distinct draws from 0..VALUE_RANGE-1 per column
DIRICHLET_ALPHA = 1.0
WEIGHT_DECIMALS = 4
MIN_INFORMATIVE_PAIRS = 20  # PE-F: of C(10, 2) = 45
MIN_INFORMATIVE_FRACTION = 0.25  # PE-G: of all (pair, focus) combinations
MAX_DIM = 32  # attributes; far above the paper's 6 / 8, and a table a model can still read
MAX_FOCUS_SETS = 5000  # C(D, S) focus sets checked per drawn table (C(6, 3) = 20 in the paper)
MAX_DRAWS = 1000
"""Draws of one instance before giving up. Valid parameters need a handful (the rejection rules drop a
minority of draws); the bound turns parameters that make nearly every draw degenerate into an error."""
_SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class PEDataConfig:
    """What one PE dataset is made of."""

    variant: str
    """"gated" (PE-G) or "full" (PE-F)."""
    D: int
    """Number of attributes."""
    S: int | None
    """Focus size (gated only)."""
    max_turns: int
    """Even number of turns: (max_turns/2) Action rounds, (max_turns/2 - 1) Update rounds, 1 Answer round."""
    n_movies: int = N_MOVIES
    prompt: str = "full"
    """The system prompt's wording (:data:`~verl_selflock.envs.pe.prompts.PROMPT_STYLES`)."""

    def __post_init__(self) -> None:
        # InvalidInput is a ValueError: the messages name the CLI option too, as the CLI shows them as they are.
        if self.variant not in PE_VARIANTS:
            raise InvalidInput(f"--variant must be one of {PE_VARIANTS}, got {self.variant!r}")
        if not 2 <= self.D <= MAX_DIM:
            raise InvalidInput(f"the number of attributes D (--D) must be in 2..{MAX_DIM}, got {self.D}")
        if self.variant == "gated":
            # S = 1: every one-attribute comparison is dominated (values are distinct), so no query is
            # informative and no instance could ever be drawn.
            if self.S is None or not 2 <= self.S < self.D:
                raise InvalidInput(f"gated PE needs a focus size S (--S) in 2..{self.D - 1} (< D={self.D}), got {self.S}")
            if math.comb(self.D, self.S) > MAX_FOCUS_SETS:
                raise InvalidInput(
                    f"gated PE with D={self.D}, S={self.S} has {math.comb(self.D, self.S)} focus sets (at most "
                    f"{MAX_FOCUS_SETS}: each instance checks them all); use a smaller --D or --S"
                )
        if self.max_turns < 2 or self.max_turns % 2:
            raise InvalidInput(f"max_turns (--max-turns) must be even and >= 2, got {self.max_turns}")
        if self.prompt not in PROMPT_STYLES:
            raise InvalidInput(f"prompt (--prompt) must be one of {PROMPT_STYLES}, got {self.prompt!r}")
        if not 2 <= self.n_movies <= VALUE_RANGE:
            raise InvalidInput(f"n_movies (--movies) must be in 2..{VALUE_RANGE}, got {self.n_movies}")

    @property
    def data_source(self) -> str:
        return data_source_name(self.variant, self.S if self.variant == "gated" else self.D)


def pe_data_config(
    variant: str,
    size_param: int,
    max_turns: int | None = None,
    *,
    gated_dim: int = GATED_DIM,
    n_movies: int = N_MOVIES,
    prompt: str = "full",
) -> PEDataConfig:
    """The configuration named as the builder's options name it: ``size_param`` is S for gated (with
    ``gated_dim`` attributes) and D for full; ``max_turns`` None is the task's default."""
    if variant not in PE_VARIANTS:
        raise InvalidInput(f"--variant must be one of {PE_VARIANTS}, got {variant!r}")
    turns = int(max_turns) if max_turns is not None else DEFAULT_MAX_TURNS[variant]
    if variant == "gated":
        return PEDataConfig(variant, int(gated_dim), int(size_param), turns, int(n_movies), prompt)
    return PEDataConfig(variant, int(size_param), None, turns, int(n_movies), prompt)


def data_source_name(variant: str, size_param: int) -> str:
    """``pe_g_s<S>`` for gated, ``pe_f_d<D>`` for full."""
    return f"pe_g_s{size_param}" if variant == "gated" else f"pe_f_d{size_param}"


def count_informative_queries(movies: np.ndarray, S: int | None) -> tuple[int, int]:
    """(informative, total) queries of a table: pairs (full) or (pair, focus) combinations (gated)."""
    n, D = movies.shape
    rows_i, rows_j = np.triu_indices(n, k=1)
    diff = movies[rows_i] - movies[rows_j]  # (pairs, D)
    pos, neg = diff >= DOMINANCE_TOL, diff <= -DOMINANCE_TOL
    if S is None:
        # Not dominated = not all positive and not all negative.
        informative = ~(pos.all(axis=1) | neg.all(axis=1))
        return int(informative.sum()), len(diff)
    count = total = 0
    for focus in itertools.combinations(range(D), S):
        cols = list(focus)
        informative = ~(pos[:, cols].all(axis=1) | neg[:, cols].all(axis=1))
        count += int(informative.sum())
        total += len(diff)
    return count, total


def sample_pe_instance(rng: np.random.Generator, config: PEDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Draw one non-degenerate (movies, w*) pair; see the module docstring for the rules."""
    S = config.S if config.variant == "gated" else None
    for _ in range(MAX_DRAWS):
        movies = np.stack(
            [rng.choice(VALUE_RANGE, size=config.n_movies, replace=False) for _ in range(config.D)], axis=1
        ).astype(np.float64)
        informative, total = count_informative_queries(movies, S)
        if S is None and informative < min(MIN_INFORMATIVE_PAIRS, total):
            continue
        if S is not None and informative < MIN_INFORMATIVE_FRACTION * total:
            continue
        w_star = np.round(rng.dirichlet(np.full(config.D, DIRICHLET_ALPHA)), WEIGHT_DECIMALS)
        if not np.any(w_star > 0):
            continue
        prior_cos = w_star.sum() / (np.sqrt(config.D) * np.linalg.norm(w_star))
        if prior_cos > COS_THRESHOLD:
            continue  # the equal-weights prior would already be rewarded: no need to ask anything
        return movies, w_star
    raise InvalidInput(
        f"no usable {config.data_source} instance in {MAX_DRAWS} draws (D={config.D}, S={config.S}, "
        f"movies={config.n_movies}): nearly every table is degenerate; change --D, --S or --movies"
    )


def make_pe_spec(
    config: PEDataConfig, movies: np.ndarray, w_star: np.ndarray, seed: int, instance_id: str
) -> dict[str, Any]:
    """The environment spec (``extra_info["env"]``): JSON-serialisable, everything the env needs."""
    spec: dict[str, Any] = {
        "task": "pe",
        "variant": config.variant,
        "D": config.D,
        "movies": [[float(v) for v in row] for row in movies],
        "w_star": [float(v) for v in w_star],
        "max_turns": config.max_turns,
        "cos_threshold": COS_THRESHOLD,
        "seed": seed,
        "id": instance_id,
    }
    if config.variant == "gated":
        spec["S"] = config.S
    if config.prompt != "full":  # absent means full: datasets built before the key existed stay byte-identical
        spec["prompt"] = config.prompt
    return spec


def _fingerprint(movies: np.ndarray, w_star: np.ndarray) -> bytes:
    return movies.tobytes() + w_star.tobytes()


def spec_fingerprint(spec: dict[str, Any]) -> bytes:
    movies = np.asarray([list(map(float, row)) for row in spec["movies"]], dtype=np.float64)
    return _fingerprint(movies, np.asarray(list(map(float, spec["w_star"])), dtype=np.float64))


def build_pe_rows(
    config: PEDataConfig, n_train: int, n_test: int, seed: int, progress: bool = True
) -> dict[str, list[dict]]:
    """Rows of both splits. Instance ``k`` of a split depends only on (seed, config, split, k), so
    growing one split never changes the other; test instances equal to a train one are redrawn."""
    variant_code = PE_VARIANTS.index(config.variant)
    seen: set[bytes] = set()

    def make_row(split: str, index: int) -> dict[str, Any]:
        for attempt in range(MAX_DRAWS):
            entropy = [seed, variant_code, config.D, config.S or 0, config.n_movies, _SPLITS[split], index, attempt]
            movies, w_star = sample_pe_instance(np.random.default_rng(entropy), config)
            key = _fingerprint(movies, w_star)
            if key not in seen:
                break
        else:
            raise InvalidInput(
                f"could not draw {split} instance {index} distinct from the {len(seen)} before it in {MAX_DRAWS} "
                f"draws: {config.data_source} with {config.n_movies} movies has too few distinct instances; ask for fewer"
            )
        seen.add(key)
        spec = make_pe_spec(config, movies, w_star, seed, f"{config.data_source}-{split}-{index:05d}")
        ground_truth = json.dumps(spec["w_star"])
        return dataset_row(
            config.data_source, pe_messages(spec), "preference_estimation", ground_truth, index=index, split=split, spec=spec
        )

    return split_rows({"train": n_train, "test": n_test}, make_row, f"building {config.data_source}", progress)
