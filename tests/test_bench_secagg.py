"""The secure-aggregation benchmark measures what it says: byte counts, error bounds and the JSON it writes.

Why: the lead quotes this benchmark's ratios, so a wrong byte count or a broken aggregate must fail CI rather
than end up in a report. A tiny cell (2000 parameters, 3 sites) runs both protocols in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_loader import load_benchmark
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import ndarray_to_bytes

N_PARAMS, N_SITES = 2000, 3


bench = load_benchmark("secagg_bench")


def _deflated_size(obj, seen: set[str]) -> int:
    """Own walk over the inflatable-object tree (not the benchmark's helper): each distinct object once."""
    total = 0
    for child in (obj.children or {}).values():
        total += _deflated_size(child, seen)
    if obj.object_id not in seen:
        seen.add(obj.object_id)
        total += len(obj.deflate())
    return total


def _size(content: RecordDict) -> int:
    return _deflated_size(content, set())


@pytest.fixture(scope="module")
def cell() -> dict:
    return bench.run_cell(N_PARAMS, N_SITES, bench.BenchSettings(), representative=False, keep_messages=True)


def test_reported_bytes_match_independent_serialisation(cell: dict) -> None:
    assert cell["mode"] == "full", cell.get("reason")
    for impl in ("ours", "flower"):
        res = cell[impl]
        per_site = []
        for nid, stages in res["_messages"].items():
            sizes = {stage: _size(content) for stage, content in stages.items()}
            assert sizes == res["_stage_bytes"][nid], impl
            per_site.append(sum(sizes.values()))
        assert res["upload_bytes_per_site"] == pytest.approx(np.mean(per_site))
        assert res["upload_bytes_by_stage"] == pytest.approx(
            {s: np.mean([res["_stage_bytes"][n][s] for n in res["_stage_bytes"]]) for s in res["upload_bytes_by_stage"]}
        )
    assert cell["ratios"]["upload_bytes_per_site"] == pytest.approx(
        cell["ours"]["upload_bytes_per_site"] / cell["flower"]["upload_bytes_per_site"]
    )


def test_masked_vector_bytes_match_records_built_from_scratch(cell: dict) -> None:
    # The size of a serialised record does not depend on the values, so records built here from zero vectors of
    # the same dtype and length must have exactly the sizes the benchmark reported for the masked-vector stage.
    ours_ref = RecordDict(
        {
            "header": ConfigRecord(
                next(iter(cell["ours"]["_messages"].values()))["masked_input"]["header"]  # same header fields
            ),
            "masked": ArrayRecord({"y": Array(np.zeros(N_PARAMS, dtype=np.uint32))}),
        }
    )
    flower_ref = RecordDict(
        {
            "secaggplus_configs": ConfigRecord(
                {
                    "masked_params": [
                        ndarray_to_bytes(np.zeros(1, dtype=np.int64)),  # the weight factor Flower prepends
                        ndarray_to_bytes(np.zeros(N_PARAMS, dtype=np.int64)),
                    ]
                }
            )
        }
    )
    ours_sizes = {v["masked_input"] for v in cell["ours"]["_stage_bytes"].values()}
    flower_sizes = {v["collect_masked_vectors"] for v in cell["flower"]["_stage_bytes"].values()}
    assert ours_sizes == {_size(ours_ref)}
    assert flower_sizes == {_size(flower_ref)}
    # And the payload dominates as the wire formats say: 4 bytes/element for ours, 8 for Flower's int64.
    (ours_masked,), (flower_masked,) = ours_sizes, flower_sizes
    assert 4 * N_PARAMS < ours_masked < 4 * N_PARAMS + 1500
    assert 8 * (N_PARAMS + 1) < flower_masked < 8 * (N_PARAMS + 1) + 1500


def test_aggregate_error_within_bounds(cell: dict) -> None:
    ours = cell["ours"]
    assert 0 < ours["rel_l2_error"] < 3 * ours["expected_rel_l2"]
    assert ours["max_abs_error"] <= ours["worst_case_abs_error"]
    assert ours["rel_l2_error"] < 1e-6
    # Flower's replayed server side must reproduce its own quantisation error, not garbage from uncancelled masks.
    flower = cell["flower"]
    assert 0.5 * flower["expected_rel_l2"] < flower["rel_l2_error"] < 2 * flower["expected_rel_l2"]


def test_representative_mode_gives_a_correct_aggregate() -> None:
    # Pairwise masks are elided for the aggregate; if that broke cancellation the error would be ~1, not ~1e-7.
    rep = bench.run_cell(N_PARAMS, N_SITES, bench.BenchSettings(), representative=True)
    assert rep["mode"] == "representative"
    for impl in ("ours", "flower"):
        res = rep[impl]
        assert res["rel_l2_error"] < 2 * res["expected_rel_l2"] + 1e-9, impl
        assert res["client_mask_s_total_is_estimate"]
        assert res["representative"]["masked_bytes_full_masks"] > 4 * N_PARAMS
    assert rep["ours"]["rel_l2_error"] < 1e-6


def test_cli_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md = tmp_path / "secagg.json", tmp_path / "secagg.md"
    args = ["--sizes", str(N_PARAMS), "--sites", str(N_SITES), "--out", str(out), "--md", str(md)]
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert {"benchmark", "created", "machine", "settings", "method", "cells", "ratios", "elapsed_s"} <= set(data)
    assert set(data["ratios"]) == set(bench.RATIO_METRICS)
    for metric in bench.RATIO_METRICS:
        assert {"by_cell", "min", "max", "geomean"} <= set(data["ratios"][metric])
        assert data["ratios"][metric]["geomean"] > 0
    (c,) = data["cells"]
    assert {"n_params", "n_sites", "threshold", "mode", "ours", "flower", "ratios"} <= set(c)
    for impl in ("ours", "flower"):
        assert set(bench.RATIO_METRICS) <= set(c[impl])
        assert not any(k.startswith("_") for k in c[impl])  # in-memory records never reach the JSON
    assert data["settings"]["flower_clipping_range"] == 8.0
    assert data["settings"]["flower_quantization_range"] == 2**22
    assert data["settings"]["flower_modulus_range"] == 2**32
    table = md.read_text()
    assert "| 2k | 3 |" in table and "upload MB/site ours" in table
    assert table in capsys.readouterr().out


def test_flower_with_matched_quantisation_has_our_error() -> None:
    # With Flower's clipping_range and quantization_range matched to ours the two errors must agree: evidence
    # that the error ratio in the report comes from Flower's default parameters, not from a broken replay.
    settings = bench.BenchSettings(flower_clipping_range=0.5, flower_quantization_range=0)
    c = bench.run_cell(N_PARAMS, N_SITES, settings, representative=False)
    assert c["flower"]["quant"]["quantization_range"] == (2**32 - 1) // N_SITES
    assert 0.5 < c["ratios"]["rel_l2_error"] < 2.0
