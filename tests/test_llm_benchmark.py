"""The LLM step-cost benchmark, end to end on a tiny Llama on the CPU (`--quick`).

Why: the script waits for a lent GPU, where there is one try at it. Every code path that can run on a CPU (model
build, the three modes, the probe, the output files) must work before then, and its DP step must really clip:
a benchmark of a step that skips clipping would understate what DP costs.
"""

from __future__ import annotations

import json

import pytest
import torch
from bench_loader import load_benchmark

CLIP = 0.01  # small enough that every example of the tiny model is clipped


llm = load_benchmark("llm")


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> dict:
    stem = tmp_path_factory.mktemp("llm") / "llm-quick"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            assert llm.main(["--quick", "--threads", "1", "--max-grad-norm", str(CLIP), "--out", str(stem)]) == 0
        finally:
            torch.set_num_threads(threads)  # main pins one thread for the whole process
    assert "| tiny | dp-exact |" in stem.with_suffix(".md").read_text()
    return json.loads(stem.with_suffix(".json").read_text())


def test_every_mode_reports_throughput_or_an_error(payload: dict) -> None:
    expected = {"tiny": set(llm.MODES)}
    if payload["four_bit"]["status"] == "bitsandbytes not installed":
        assert payload["settings"]["four_bit"] == []
    else:
        expected["tiny" + llm.FOUR_BIT_SUFFIX] = set(llm.FOUR_BIT_MODES)
    assert set(payload["results"]) == set(expected)
    for label, modes in expected.items():
        result = payload["results"][label]
        assert set(result["modes"]) == modes, label
        for mode, entry in result["modes"].items():
            assert entry.get("error") or (entry["tokens_per_s"] > 0 and entry["median_step_s"] > 0), (label, mode)
    nondp = payload["results"]["tiny"]["modes"]["nondp"]
    assert nondp["ratio_to_nondp"] == 1.0 and nondp["process_peak_rss_gib"] > 0


def test_exact_dp_step_clips_every_example_and_adds_noise(payload: dict) -> None:
    modes = payload["results"]["tiny"]["modes"]
    exact = modes["dp-exact"]
    assert exact["clipped_fraction_last_step"] == 1.0
    assert exact["clipped_norms_within_c"] and exact["max_clipped_norm"] == pytest.approx(CLIP, rel=1e-3)
    # Same LoRA start, same batch: the clipped, noised update is not the plain gradient step.
    assert exact["first_update_norm"] != pytest.approx(modes["nondp"]["first_update_norm"], rel=1e-3)


def test_probe_checks_exact_clipping_against_opacus_and_decides_checkpointing(payload: dict) -> None:
    probe = payload["ghost_checkpointing_probe"]
    assert probe["without_checkpointing"]["ok"], probe  # dp-exact and Opacus ghost clipping give the same update
    ghost = payload["results"]["tiny"]["modes"]["dp-ghost"]
    assert ghost["checkpointing"] == probe["with_checkpointing"]["ok"]
    if not ghost["checkpointing"]:
        assert ghost["why"]
