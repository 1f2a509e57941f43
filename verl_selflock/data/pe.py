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

``--demos N`` (:func:`build_pe_demos`) also writes ``demos.parquet``: N episodes of the expert policy
(:mod:`verl_selflock.envs.pe.expert`) on train instances, as veRL SFT rows (:mod:`verl_selflock.data.demos`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from verl_selflock.data.demos import DEMOS_SPLIT, check_demo_request, demo_row, write_demos
from verl_selflock.data.parquet import check_count, check_out_dir, write_splits
from verl_selflock.data.pe_instances import (
    GATED_DIM,
    N_MOVIES,
    PEDataConfig,
    build_pe_rows,
    count_informative_queries,
    data_source_name,
    make_pe_spec,
    pe_data_config,
    sample_pe_instance,
    spec_fingerprint,
)
from verl_selflock.envs.pe.env import PE_VARIANTS
from verl_selflock.envs.pe.expert import play_pe_expert
from verl_selflock.envs.pe.prompts import PROMPT_STYLES
from verl_selflock.errors import InvalidInput

__all__ = [
    "PEDataConfig",
    "pe_data_config",
    "count_informative_queries",
    "sample_pe_instance",
    "make_pe_spec",
    "build_pe_rows",
    "build_pe_dataset",
    "build_pe_demos",
    "data_source_name",
    "add_arguments",
    "run",
]


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
    prompt: str = "full",
    progress: bool = True,
    demos: int = 0,
) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` (and ``demos.parquet`` when ``demos`` > 0) under ``out_dir``.

    Args:
        variant: "gated" (PE-G) or "full" (PE-F).
        size_param: the focus size S for gated, the number of attributes D for full.
        n_train, n_test: rows per split.
        seed: dataset seed; the same arguments give identical files.
        out_dir: output folder (created).
        max_turns: even turn budget; default 10 (gated) / 12 (full).
        gated_dim: number of attributes D of the gated variant.
        n_movies: reference movies per instance.
        prompt: the system prompt's wording, ``full`` or ``compact`` (:data:`~verl_selflock.envs.pe.prompts.PROMPT_STYLES`).
        demos: expert demonstrations to write beside the splits (:func:`build_pe_demos`); all files are
            written together or none.

    Returns:
        ``{"train": path, "test": path}`` (and ``"demos": path``).
    """
    if variant not in PE_VARIANTS:
        raise InvalidInput(f"--variant must be one of {PE_VARIANTS}, got {variant!r}")
    check_count(n_train, "n_train (--train)", minimum=0)  # one empty split is allowed here (eval builds test only)
    check_count(n_test, "n_test (--test)", minimum=0)
    if n_train + n_test == 0:
        raise InvalidInput("n_train and n_test (--train, --test) are both 0: nothing to build")
    check_count(seed, "seed (--seed)", minimum=0)  # numpy's SeedSequence refuses negative entropy
    check_count(demos, "demos (--demos)", minimum=0)
    check_out_dir(out_dir, ("train", "test", DEMOS_SPLIT) if demos else ("train", "test"))
    config = pe_data_config(variant, size_param, max_turns, gated_dim=gated_dim, n_movies=n_movies, prompt=prompt)
    rows = build_pe_rows(config, n_train, n_test, seed, progress=progress)
    if demos:
        rows[DEMOS_SPLIT] = _demo_rows(config, demos, seed, rows["test"], seed, None, progress)
    return write_splits(rows, out_dir)


def _demo_rows(
    config: PEDataConfig, n: int, seed: int, test_rows: list[dict], expert_seed: int, tokenizer: Any, progress: bool
) -> list[dict[str, Any]]:
    """Rows of ``n`` expert episodes on train-split instances ``0, 1, ...`` of ``seed``, skipping any equal to
    an instance of ``test_rows`` (instances below the dataset's train size never are: the builder redraws)."""
    from tqdm import tqdm

    test = {spec_fingerprint(row["extra_info"]["env"]) for row in test_rows}
    wanted = n
    while True:
        train = build_pe_rows(config, wanted, 0, seed, progress=False)["train"]
        kept = [row for row in train if spec_fingerprint(row["extra_info"]["env"]) not in test]
        if len(kept) >= n:
            break
        wanted += n - len(kept)
    out = []
    for index, row in enumerate(tqdm(kept[:n], desc=f"expert demos {config.data_source}", disable=not progress)):
        demo = play_pe_expert(row["extra_info"]["env"], seed=expert_seed)
        out.append(demo_row(config.data_source, row["prompt"], demo, index=index, dataset_seed=seed, tokenizer=tokenizer))
    return out


def build_pe_demos(
    config: PEDataConfig,
    n: int,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    n_train: int = 700,
    n_test: int = 300,
    expert_seed: int | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Path:
    """Write ``<out_dir>/demos.parquet``: ``n`` episodes of the expert (:mod:`verl_selflock.envs.pe.expert`) as
    veRL multi-turn SFT rows (:mod:`verl_selflock.data.demos`).

    The instances are those of the train split that ``build_pe_dataset(..., seed, n_train, n_test)`` writes
    (index 0, 1, ...; beyond ``n_train``, more draws of the same rule), never one of its test split.

    Args:
        config: the dataset's configuration.
        n: episodes.
        seed: the dataset seed.
        out_dir: output folder (created).
        n_train, n_test: the dataset's split sizes (the test split the demos must avoid).
        expert_seed: seeds the expert's prior draws and tie-breaks (default: ``seed``).
        tokenizer: the policy's tokenizer, to cap observations as the agent loop does (optional).

    Returns:
        The path of ``demos.parquet``.
    """
    expert_seed = check_demo_request(n, seed, n_train, n_test, expert_seed, out_dir)
    test_rows = build_pe_rows(config, n_train, n_test, seed, progress=False)["test"]
    return write_demos(_demo_rows(config, n, seed, test_rows, expert_seed, tokenizer, progress), out_dir)


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
    parser.add_argument(
        "--prompt", choices=PROMPT_STYLES, default="full",
        help="system prompt wording: full (the paper's scale) or compact (the same rules in fewer tokens, for "
        "small models on small machines)",
    )
    parser.add_argument(
        "--demos",
        type=int,
        default=0,
        help="also write demos.parquet next to train/test: this many episodes played by the expert policy "
        "(envs/pe/expert.py) on train-split instances (never a test instance), as veRL multi-turn SFT rows "
        "(column 'messages') for a supervised warm start (default 0: none)",
    )
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
        prompt=args.prompt,
        progress=not args.no_progress,
        demos=args.demos,
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
