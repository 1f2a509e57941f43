"""Build seeded Preference Estimation datasets (PE-G gated, PE-F full) as veRL parquet files.

``verl-selflock data pe --variant gated --S 3 --train 700 --test 300 --seed 0 --out data/pe_g_s3``

The original data (a HF-hub release derived from DeepMind's Multi-Turn Puzzles) is not used: we
generate our own instances, deterministically for a seed. Parameters and why:

* **Attributes**: ``D = 6`` for PE-G (focus size ``S`` in {2, 3}); ``D`` in {6, 8} for PE-F.
* **Movies**: 10 reference movies. Each attribute column holds 10 *distinct* whole numbers drawn
  from 0..19, so every difference ``x_i - x_j`` has non-zero components: the dominance critique
  never meets a tie, and the table stays easy to read for a language model.
* **Hidden weights**: ``w* ~ Dirichlet(1, ..., 1)`` (uniform on the simplex), rounded to 4
  decimals. Instances where the uninformed prior guess (equal weights) already scores, i.e.
  ``cos(1, w*) > 0.88``, are resampled: without that, about 16% (D=6) / 9% (D=8) of episodes
  reward an agent that never looks at the feedback, the very shortcut behind self-locking.
* **Degenerate tables are resampled**: fewer than 20 of the 45 pairs informative (PE-F), or fewer
  than 25% of the (pair, focus) combinations informative (PE-G). "Informative" = not dominated.

Solvability (a one-off simulation run while choosing these parameters, not shipped: a Bayesian
agent that knows the prior, asks the non-dominated query closest to a 50/50 split of 4,000
particles, and answers the posterior mean; 150 instances each): success 69% (PE-G S=2), 81%
(PE-G S=3), 86% (PE-F D=6), 71% (PE-F D=8) within the default budgets, 0% for the prior answer.
With Dirichlet(0.5) weights it was 47-65% on PE-G, which is why alpha = 1 was kept.

Row layout (what veRL's ``RLHFDataset`` reads): ``prompt`` (system + first user message),
``data_source`` (``pe_g_s3``, ``pe_f_d8`` ...), ``agent_name`` = ``"active_reasoning"``,
``ability``, ``reward_model`` = ``{"style": "rule", "ground_truth": json.dumps(w_star)}`` (veRL
never shows ``reward_model`` to the policy; our reward comes from the environment, which reads the
spec) and ``extra_info`` = ``{"index", "split", "env": spec}`` with the environment spec of
:class:`verl_selflock.envs.pe.env.PreferenceEstimationEnv`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from verl_selflock.data.parquet import check_count, check_out_dir, dataset_row, split_rows, write_splits
from verl_selflock.envs.pe.env import DEFAULT_MAX_TURNS, PE_VARIANTS
from verl_selflock.envs.pe.geometry import COS_THRESHOLD, DOMINANCE_TOL
from verl_selflock.envs.pe.prompts import pe_messages
from verl_selflock.errors import InvalidInput

__all__ = [
    "PEDataConfig",
    "count_informative_queries",
    "sample_pe_instance",
    "make_pe_spec",
    "build_pe_rows",
    "build_pe_dataset",
    "data_source_name",
    "add_arguments",
    "run",
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
        if not 2 <= self.n_movies <= VALUE_RANGE:
            raise InvalidInput(f"n_movies (--movies) must be in 2..{VALUE_RANGE}, got {self.n_movies}")

    @property
    def data_source(self) -> str:
        return data_source_name(self.variant, self.S if self.variant == "gated" else self.D)


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
    return spec


def _fingerprint(movies: np.ndarray, w_star: np.ndarray) -> bytes:
    return movies.tobytes() + w_star.tobytes()


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


def build_pe_dataset(
    variant: str,
    size_param: int,
    n_train: int,
    n_test: int,
    seed: int,
    out_dir: str | os.PathLike,
    max_turns: int | None = None,
    *,
    gated_dim: int = GATED_DIM,
    n_movies: int = N_MOVIES,
    progress: bool = True,
) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` under ``out_dir``.

    Args:
        variant: "gated" (PE-G) or "full" (PE-F).
        size_param: the focus size S for gated, the number of attributes D for full.
        n_train, n_test: rows per split.
        seed: dataset seed; the same arguments give identical files.
        out_dir: output folder (created).
        max_turns: even turn budget; default 10 (gated) / 12 (full).
        gated_dim: number of attributes D of the gated variant.
        n_movies: reference movies per instance.

    Returns:
        ``{"train": path, "test": path}``.
    """
    if variant not in PE_VARIANTS:
        raise InvalidInput(f"--variant must be one of {PE_VARIANTS}, got {variant!r}")
    check_count(n_train, "n_train (--train)", minimum=0)  # one empty split is allowed here (eval builds test only)
    check_count(n_test, "n_test (--test)", minimum=0)
    if n_train + n_test == 0:
        raise InvalidInput("n_train and n_test (--train, --test) are both 0: nothing to build")
    check_count(seed, "seed (--seed)", minimum=0)  # numpy's SeedSequence refuses negative entropy
    check_out_dir(out_dir)
    turns = int(max_turns) if max_turns is not None else DEFAULT_MAX_TURNS[variant]
    if variant == "gated":
        config = PEDataConfig(variant, gated_dim, int(size_param), turns, n_movies)
    else:
        config = PEDataConfig(variant, int(size_param), None, turns, n_movies)
    rows = build_pe_rows(config, n_train, n_test, seed, progress=progress)
    return write_splits(rows, out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock data pe``."""
    parser.add_argument("--variant", choices=PE_VARIANTS, default="gated", help="gated = PE-G, full = PE-F")
    parser.add_argument("--S", type=int, default=3, help="focus size of PE-G (2 or 3 in the paper)")
    parser.add_argument(
        "--D", type=int, default=None, help=f"attributes: PE-F 6 or 8 (default 8); PE-G default {GATED_DIM}"
    )
    parser.add_argument("--train", type=int, default=700, help="training rows")
    parser.add_argument("--test", type=int, default=300, help="test rows")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same files)")
    parser.add_argument("--out", required=True, help="output folder for train.parquet and test.parquet")
    parser.add_argument("--max-turns", type=int, default=None, help="even turn budget (default 10 gated, 12 full)")
    parser.add_argument("--movies", type=int, default=N_MOVIES, help="reference movies per instance")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by ``args``; print the paths."""
    check_count(args.train, "--train")  # from the command line both splits are needed (training + validation)
    check_count(args.test, "--test")
    if args.variant == "gated":
        size_param, gated_dim = args.S, args.D if args.D is not None else GATED_DIM
    else:
        size_param, gated_dim = args.D if args.D is not None else 8, GATED_DIM
    paths = build_pe_dataset(
        args.variant,
        size_param,
        args.train,
        args.test,
        args.seed,
        args.out,
        args.max_turns,
        gated_dim=gated_dim,
        n_movies=args.movies,
        progress=not args.no_progress,
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
