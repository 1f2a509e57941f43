"""Supervised warm start with veRL's own SFT trainer (``verl.trainer.sft_trainer``).

Small models (0.1-3B) fail the turn format of a multi-turn task from the first step, and RL on a batch
where every turn is invalid teaches nothing (every critique is -1, so zero-sum AREW has nothing to move).
The remedy is a short supervised pass on demonstrations (:mod:`verl_selflock.data.demos`, played by the
task's expert) before RL. We run veRL's trainer unchanged, under ``torchrun`` with one process:

* on GPUs, exactly as veRL documents it (``recipes/pe_g/sft_warmstart.yaml``);
* on a CPU with ``VERL_PLATFORM=cpu``: our CPU platform gives the FSDP engine a gloo process group and
  CPU device handling (:mod:`verl_selflock.verl_adapter.cpu.patches`), nothing else changes.

The trainer saves the full model as a Hugging Face folder (``checkpoint.save_contents=[hf_model]``) at
``<out>/global_step_<N>/huggingface``; :func:`warm_start` returns that folder, which veRL's PPO trainer
loads like any other checkpoint. :func:`warm_started_smollm2` builds the embedded default's model once
(demonstrations, then SFT) and caches it by every input that changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from verl_selflock.cache import build_once, cache_dir
from verl_selflock.data.pe import PEDataConfig

__all__ = ["SFTSettings", "hf_folder_of", "sft_command", "warm_start", "warm_started_smollm2"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTSettings:
    """What the warm start trains with. The defaults fit SmolLM2-135M on two CPU cores in minutes: one
    pass of full fine-tuning over the demonstrations; the format is what must be learnt, and the loss on
    the expert's turns halves within the first steps at this learning rate."""

    epochs: int = 1
    lr: float = 2.0e-4
    batch_size: int = 8
    micro_batch_size: int = 2
    max_length: int = 4096  # a 10-turn PE episode with the full prompt is ~2,500 tokens; nothing is padded
    seed: int = 0


def sft_command(model_path: str, train_files: str, out_dir: str | os.PathLike, settings: SFTSettings) -> list[str]:
    """The ``torchrun`` command line of veRL's SFT trainer for one warm start (one process).

    veRL's engine defaults stay (gradient checkpointing, torch.compile). On two CPU cores they were also
    the faster setting for SmolLM2-135M: 29-32 s per step of 8 demonstrations, against 81-206 s with both
    off (which held ~8 GB of activations; measured on a shared machine, so the gap is approximate).
    """
    overrides = {
        "data.train_files": train_files,
        "data.val_files": "null",
        "data.messages_key": "messages",
        "data.train_batch_size": settings.batch_size,
        "data.micro_batch_size_per_gpu": settings.micro_batch_size,
        "data.use_dynamic_bsz": "false",
        "data.max_length": settings.max_length,
        # A demonstration longer than max_length is a builder bug, not something to train on silently.
        "data.truncation": "error",
        "data.num_workers": 0,
        "model.path": model_path,
        "model.use_remove_padding": "false",
        "engine.strategy": "fsdp2",
        "optim.lr": settings.lr,
        "optim.lr_warmup_steps_ratio": 0.1,
        "optim.lr_scheduler_type": "cosine",
        "trainer.total_epochs": settings.epochs,
        "trainer.seed": settings.seed,
        "trainer.logger": "[console]",
        "trainer.save_freq": -1,
        "trainer.test_freq": -1,
        "trainer.resume_mode": "disable",
        "trainer.default_local_dir": str(out_dir),
        "trainer.project_name": "verl_selflock",
        "trainer.experiment_name": "warm_start",
        "checkpoint.save_contents": "[hf_model]",
    }
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "verl.trainer.sft_trainer",
        *(f"{key}={value}" for key, value in overrides.items()),
    ]


def hf_folder_of(out_dir: str | os.PathLike) -> Path:
    """The Hugging Face folder of the last checkpoint veRL's SFT trainer wrote under ``out_dir``."""
    out_dir = Path(out_dir)
    tracker = out_dir / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        raise FileNotFoundError(f"veRL's SFT trainer wrote no checkpoint under {out_dir} (no {tracker.name})")
    folder = out_dir / f"global_step_{int(tracker.read_text().strip())}" / "huggingface"
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} holds no Hugging Face model (checkpoint.save_contents needs hf_model)")
    return folder


def warm_start(
    model_path: str, demos_parquet: str | os.PathLike, out_dir: str | os.PathLike, settings: SFTSettings | None = None
) -> Path:
    """Fine-tune ``model_path`` on the demonstrations with veRL's SFT trainer; return the HF folder.

    The trainer runs in a child process (``torchrun`` needs its own process group); its output goes to
    ``<out_dir>/sft.log``, whose tail is in the error when it fails.
    """
    settings = settings or SFTSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = sft_command(model_path, str(demos_parquet), out_dir / "checkpoints", settings)
    log_path = out_dir / "sft.log"
    logger.warning("Warm start: veRL's SFT trainer on %s (log: %s)", demos_parquet, log_path)
    with log_path.open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir, check=False)
    if done.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"veRL's SFT trainer failed (exit {done.returncode}); last lines of {log_path}:\n{tail}")
    return hf_folder_of(out_dir / "checkpoints")


def warm_started_smollm2(config: PEDataConfig, demos_parquet: str | os.PathLike, seed: int = 0) -> str:
    """SmolLM2-135M-Instruct warm-started on PE demonstrations, built once and cached.

    The cache key holds every input that changes the weights (the task, the demonstrations' bytes, the
    SFT settings, veRL's version), so a change rebuilds instead of reusing a stale model. Returns a
    self-contained HF folder (the checkpoint's model, copied out; the SFT log kept beside it).
    """
    import verl

    from verl_selflock.models.smollm2 import smollm2_path

    settings = SFTSettings(seed=int(seed))
    demos_digest = hashlib.sha256(Path(demos_parquet).read_bytes()).hexdigest()
    key = json.dumps(
        {"task": asdict(config), "demos": demos_digest, "sft": asdict(settings), "verl": verl.__version__},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = smollm2_path()

    def build(folder: Path) -> None:
        work = Path(str(folder) + ".work")
        shutil.rmtree(work, ignore_errors=True)
        trained = warm_start(base, demos_parquet, work, settings)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(trained, folder)
        (folder / "warm_start.json").write_text(key + "\n")
        shutil.copy2(work / "sft.log", folder / "sft.log")
        shutil.rmtree(work, ignore_errors=True)

    return str(build_once(cache_dir() / "models" / f"smollm2-135m-warm-{config.data_source}-{digest}", build))
