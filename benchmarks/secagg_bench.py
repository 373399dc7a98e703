"""Secure-aggregation benchmark: fedtune's SecAgg next to Flower 1.42's SecAgg+ (legacy workflow), same inputs.

Why this exists: the lead needs numbers, not claims, on what our own protocol costs relative to the secure
aggregation that ships with Flower: bytes each site uploads, the time a site spends masking, the time the server
spends unmasking, and how far the unmasked aggregate is from the exact float64 sum. Both protocols run in this one
process on the same site vectors (i.i.d. N(0, sigma^2), sigma = 1e-3 by default, float64 as our adapter pipeline
produces), the same node ids, site count and Shamir threshold.

How each side is driven
-----------------------
* fedtune: the :class:`SecAggSite` / :class:`SecAggServer` state machines, stage by stage, with every message put
  into the same Flower records the ClientApp/ServerApp use (``ConfigRecord`` for the dict form, an ``ArrayRecord``
  for the uint32 masked vector) and read back from them. We do not call ``run_in_process_detailed`` because it
  gives neither per-stage timings nor per-site bytes; the sequence of calls is the same.
* Flower: the client-side stage functions of ``flwr.client.mod.secure_aggregation.secaggplus_mod`` (``_setup``,
  ``_share_keys``, ``_collect_masked_vectors``, ``_unmask``) are called directly on ``SecAggPlusState`` objects
  with the ``ConfigRecord`` inputs the workflow would send, and the server side of ``SecAggPlusWorkflow``
  (neighbour graph, ciphertext routing, summing, share combination, mask removal, de-quantisation) is replayed
  with Flower's own functions (``combine_shares``, ``pseudo_rand_gen``, ``parameters_*``, ``factor_extract``,
  ``dequantize``). No Flower simulation is started, so no Ray/gRPC time is in any number.

What is measured
----------------
* upload bytes per site: the five replies of one site, each as the ``RecordDict`` a ClientApp would return,
  counted as the sum of ``deflate()`` sizes of all its inflatable objects (Flower 1.42's wire objects, without
  gRPC framing and message metadata). Only secure-aggregation records are counted (no training metrics).
* client masking time: the masking stage of one site, from the request to the reply's records being built
  (both: decrypt the peers' shares, quantise, add the self-mask and one pairwise mask per peer, serialise the
  vector into the reply record; Flower additionally scales by its weight factor, masks in int64 and reduces
  ``% 2**32``). Reported as the fastest of the samples: one to five repeats on copies of site 0's state, plus
  every site's own run in a "full" cell. The machine is shared and contention only ever adds time. All samples
  and the per-stage times of the other four stages are in the JSON.
* server unmasking time: after the masked vectors have been summed (timed separately as ``server_sum_s``):
  reconstruct every self-mask seed from Shamir shares, subtract the self-masks, de-quantise. Fastest of up to
  five repeats where a run takes well under a second, else one run.
* aggregate error: relative L2 of the unmasked aggregate against the exact float64 sum (Flower returns the
  weighted mean; we compare it with the exact mean, which is the same relative error).

Expensive cells ("representative" mode)
---------------------------------------
Masking costs (sites - 1) pairwise-mask expansions per site, so the total work grows like sites^2 x params. When
``sites^2 * params`` exceeds ``--full-budget`` (default 5e9: of the standard grid only 14M x 50), one
representative site runs the complete masking stage on a copy of its state and that time is reported (the
per-site work is identical, so total client CPU = time x sites, flagged as an estimate). For the aggregate, every
site then runs its masking stage with the pairwise-mask expansions replaced by a no-op: pairwise masks cancel
exactly modulo 2**32 (checked by every "full" cell), so the masked sum, the server's work and the aggregate error
are exactly what a full run gives. The replacement patches the PRG/arithmetic names inside the two protocol
modules for the duration of that loop only.

Parameters (the defaults; all in the JSON)
------------------------------------------
* fedtune: ``QuantSpec(clip_range=0.5, num_sites=n)``, so the scale is floor((2**32 - 1) / n / (2 * 0.5)); 0.5 =
  500 sigma clips nothing and is valid for every site count here (at 50 sites the typical relative error is still
  ~5e-6; a smaller clip range would lower it further).
* Flower SecAgg+ defaults: clipping_range 8.0, quantization_range 2**22, modulus_range 2**32, max_weight 1000 (every
  site reports num_examples = max_weight, so all weights are 1 and Flower's mean times n is the plain sum).
* Both: threshold t = the least integer above 2/3 n (fedtune's default ``threshold_fraction`` and site floor); Flower as
  ``SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=t)``: every site is every site's neighbour, the
  same complete graph and dropout tolerance as ours (the SecAgg special case of SecAgg+). ``--flower-num-shares``
  < 1 gives Flower's sparse SecAgg+ graph (cheaper masking, weaker collusion/dropout guarantees).
* No site drops out.

Run: ``.venv/bin/python benchmarks/secagg_bench.py [--quick]`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

from fedtune.client.secure_site import round_digest
from fedtune.common.config import FederationSpec
from fedtune.common.secagg import (
    THRESHOLD_FRACTION,
    AdvertiseRequest,
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    QuantSpec,
    RoundTag,
    SecAggServer,
    SecAggSite,
    ShareRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    keys,
    threshold_above,
)

# The mod module is shadowed on its package by the function of the same name, so import it by full path.
FLOWER_MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
OURS_PROTOCOL = importlib.import_module("fedtune.common.secagg.protocol")

SIZES = {"75k": 75_000, "1M": 1_000_000, "14M": 14_000_000}
FULL_SITES = (2, 10, 50)
QUICK_SIZES = ("75k", "1M")
QUICK_SITES = (2, 10)
DEFAULT_OUT = Path("benchmarks/results/secagg.json")
# The federation spec a site digests with the adapter: banking77's 77 labels, defaults otherwise.
BENCH_FEDERATION = FederationSpec.model_validate(
    {"base_model": {"path": "base-model"}, "task": {"labels": [f"intent_{i:02d}" for i in range(77)]}}
).model_dump_json()
DEFAULT_MD = Path("benchmarks/results/secagg.md")

# Metrics that get an ours / Flower ratio, with the label used in tables.
RATIO_METRICS = {
    "upload_bytes_per_site": "upload bytes / site",
    "client_mask_s": "client masking s / site",
    "server_unmask_s": "server unmasking s",
    "rel_l2_error": "aggregate rel. L2 error",
}


@dataclass(frozen=True)
class BenchSettings:
    """Everything that shapes a run; copied into the JSON so a number can always be traced to its setup."""

    sigma: float = 1e-3
    clip_range: float = 0.5
    threshold_fraction: float = THRESHOLD_FRACTION
    flower_clipping_range: float = 8.0
    flower_quantization_range: int = 2**22  # 0: the largest that n sites cannot overflow, (2**32 - 1) // n
    flower_modulus_range: int = 2**32
    flower_max_weight: float = 1000.0
    flower_num_shares: float = 1.0
    seed: int = 0
    full_budget: float = 5e9
    cache_limit_bytes: int = 2 * 2**30


# ---------------------------------------------------------------- helpers


def wire_bytes(content: RecordDict) -> int:
    """Bytes Flower 1.42 pushes for a message's content: every inflatable object's deflated form, once each.

    ``no_object_id_recompute`` is Flower's own guard against re-deflating a record every time a parent asks
    for its id; without it a 112 MB ConfigRecord is serialised ~30 times per count.
    """
    with no_object_id_recompute():
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def best_of(run_once: Callable[[], float], budget_s: float = 2.0, max_reps: int = 5) -> list[float]:
    """Seconds of repeated runs: always one, more while the total stays under ``budget_s``.

    Why: the benchmark machine is shared, and contention only ever adds time, so the fastest of a few runs is
    the least noisy estimate of a cell's intrinsic cost; expensive cells get a single run.
    """
    times = [run_once()]
    while len(times) < max_reps and sum(times) * (len(times) + 1) / len(times) <= budget_s:
        times.append(run_once())
    return times


def threshold_for(n_sites: int, fraction: float) -> int:
    """fedtune's rule (the least t above fraction x n), the one both its server and its sites apply."""
    return threshold_above(fraction, n_sites)


def size_label(n: int) -> str:
    """75000 -> '75k', 1000000 -> '1M', 2000 -> '2k'; exact otherwise."""
    for label, value in SIZES.items():
        if value == n:
            return label
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def parse_size(text: str) -> int:
    """'75k' / '1M' / '14m' / '2000' -> int, so the CLI takes the same labels the table prints."""
    t = text.strip().lower()
    mult = {"k": 1000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class SiteInputs:
    """Per-site input vectors, drawn from a seeded generator so both protocols see identical data.

    Vectors are cached when they fit ``cache_limit_bytes`` and regenerated (bit-identically) otherwise, so a
    14M x 50 cell does not hold 5.6 GB of inputs. The exact float64 sum is computed once up front.
    """

    def __init__(self, n_params: int, node_ids: Sequence[int], sigma: float, seed: int, cache_limit_bytes: int):
        self.n_params = n_params
        self.sigma = sigma
        self.seed = seed
        self._index = {nid: i for i, nid in enumerate(node_ids)}
        self._cache: dict[int, np.ndarray] | None = {} if len(node_ids) * n_params * 8 <= cache_limit_bytes else None
        total = np.zeros(n_params, dtype=np.float64)
        for nid in node_ids:
            total += self.get(nid)
        self.exact_sum = total

    def get(self, nid: int) -> np.ndarray:
        """Input vector of site ``nid`` (float64, read-only when cached)."""
        if self._cache is not None and nid in self._cache:
            return self._cache[nid]
        rng = np.random.default_rng([self.seed, self.n_params, self._index[nid]])
        x = rng.normal(0.0, self.sigma, self.n_params)
        if self._cache is not None:
            x.setflags(write=False)
            self._cache[nid] = x
        return x


def _rel_l2(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


@dataclass
class _Tally:
    """Per-site bytes and seconds by stage."""

    bytes_by_stage: dict[int, dict[str, int]]
    secs_by_stage: dict[int, dict[str, float]]

    @classmethod
    def new(cls, node_ids: Sequence[int]) -> _Tally:
        return cls({n: {} for n in node_ids}, {n: {} for n in node_ids})

    def mean_bytes(self) -> float:
        return float(np.mean([sum(v.values()) for v in self.bytes_by_stage.values()]))

    def stage_bytes_mean(self) -> dict[str, float]:
        stages = next(iter(self.bytes_by_stage.values())).keys()
        return {s: float(np.mean([v[s] for v in self.bytes_by_stage.values()])) for s in stages}

    def stage_secs_mean(self, exclude: str = "") -> dict[str, float]:
        stages = [s for s in next(iter(self.secs_by_stage.values())) if s != exclude]
        return {s: float(np.mean([v[s] for v in self.secs_by_stage.values()])) for s in stages}


def _total_mask_s(tally: _Tally, stage: str, per_site: float, n: int, representative: bool) -> float:
    # Total client CPU for the masking stage: measured sum over sites, or per-site x n where one site ran it.
    if representative:
        return per_site * n
    return float(sum(v[stage] for v in tally.secs_by_stage.values()))


def _timings(
    tally: _Tally,
    stage: str,
    rep_samples: list[float],
    node_ids: list[int],
    representative: bool,
    server_sum_s: float,
    unmask_samples: list[float],
) -> dict[str, Any]:
    """Bytes and timings reported the same way for both protocols, so their ratios compare like with like."""
    mask_samples = rep_samples + ([] if representative else [tally.secs_by_stage[nid][stage] for nid in node_ids])
    client_mask_s = min(mask_samples)
    return {
        "upload_bytes_per_site": tally.mean_bytes(),
        "upload_bytes_by_stage": tally.stage_bytes_mean(),
        "client_mask_s": client_mask_s,
        "client_mask_s_median": float(np.median(mask_samples)),
        "client_mask_s_samples": mask_samples,
        "client_mask_s_repeats_on_site0_copy": len(rep_samples),
        "client_mask_s_total": _total_mask_s(tally, stage, client_mask_s, len(node_ids), representative),
        "client_mask_s_total_is_estimate": representative,
        "client_other_stages_s": tally.stage_secs_mean(exclude=stage),
        "server_sum_s": server_sum_s,
        "server_unmask_s": min(unmask_samples),
        "server_unmask_s_samples": unmask_samples,
    }


def _representative(tally: _Tally, stage: str, node_ids: list[int], rep_bytes: int) -> dict[str, Any]:
    return {
        "node_id": node_ids[0],
        "masked_bytes_full_masks": rep_bytes,
        "elided_pairwise_client_mask_s_mean": tally.stage_secs_mean()[stage],
    }


# ---------------------------------------------------------------- fedtune side


def _ours_masked_content(msg: MaskedInput) -> RecordDict:
    # Same records as client/client_app.py's secagg_mask reply.
    return RecordDict(
        {
            "header": ConfigRecord(msg.to_dict()),
            "masked": ArrayRecord({"y": Array(np.ascontiguousarray(msg.vector, dtype=np.uint32))}),
        }
    )


@contextlib.contextmanager
def _ours_without_pairwise_masks() -> Iterator[None]:
    """Replace fedtune's pairwise-mask expansion with a zero (they cancel in the sum); see module docstring."""

    def zero(*_args: object, **_kwargs: object) -> np.uint32:
        return np.uint32(0)

    if not hasattr(OURS_PROTOCOL, "_pair_mask"):
        raise RuntimeError("fedtune.common.secagg.protocol._pair_mask is gone; representative mode needs updating")
    with mock.patch.object(OURS_PROTOCOL, "_pair_mask", zero):
        yield


def run_ours(
    inputs: SiteInputs,
    node_ids: Sequence[int],
    threshold: int,
    clip_range: float,
    *,
    representative: bool = False,
    keep_messages: bool = False,
) -> dict[str, Any]:
    """One fedtune SecAgg round over ``inputs``; returns metrics (and the reply records if ``keep_messages``)."""
    n = len(node_ids)
    names = {nid: f"site-{i:02d}" for i, nid in enumerate(node_ids)}
    ident = {nid: keys.generate_identity_key() for nid in node_ids}
    pinned = {names[nid]: keys.public_key_bytes(ident[nid]) for nid in node_ids}
    quant = QuantSpec(clip_range, n)
    server = SecAggServer(RoundTag.new(0, 1), [(nid, names[nid]) for nid in node_ids], threshold, quant)
    # Binding: each site digests the message that started the round (config with a federation spec, and an adapter
    # the size of its input) once, and signs the digest with its keys; timed like masking, fastest of a few.
    config = ConfigRecord({"federation": BENCH_FEDERATION, "run": "bench", "round": 1, "rounds": 20})
    adapter = ArrayRecord({"values": Array(inputs.get(node_ids[0]).astype(np.float32))})
    bound = b""

    def bind_once() -> float:
        nonlocal bound
        t0 = time.perf_counter()
        bound = round_digest(config, adapter)
        return time.perf_counter() - t0

    binding_s = min(best_of(bind_once, budget_s=0.5))
    sites = {
        nid: SecAggSite(nid, names[nid], ident[nid], pinned, expected_run_id=0, expected_round=1, bound=bound)
        for nid in node_ids
    }
    tally = _Tally.new(node_ids)
    kept: dict[int, dict[str, RecordDict]] = {nid: {} for nid in node_ids}

    def reply(nid: int, stage: str, make: Callable[[], RecordDict]) -> RecordDict:
        t0 = time.perf_counter()
        content = make()
        tally.secs_by_stage[nid][stage] = time.perf_counter() - t0
        tally.bytes_by_stage[nid][stage] = wire_bytes(content)
        if keep_messages:
            kept[nid][stage] = content
        return content

    # Stage 1: signed key adverts.
    req1 = AdvertiseRequest.from_dict(server.advertise_request().to_dict())
    adverts = []
    for nid in node_ids:
        c = reply(
            nid, "advertise", lambda s=sites[nid]: RecordDict({"keys": ConfigRecord(s.advertise(req1).to_dict())})
        )
        adverts.append(KeyAdvert.from_dict(dict(c["keys"])))
    server.receive_adverts(adverts)

    # Stage 2: encrypted Shamir shares.
    req2 = ShareRequest.from_dict(server.share_request().to_dict())
    shares = []
    for nid in node_ids:
        c = reply(nid, "share", lambda s=sites[nid]: RecordDict({"shares": ConfigRecord(s.share(req2).to_dict())}))
        shares.append(EncryptedShares.from_dict(dict(c["shares"])))
    server.receive_shares(shares)

    # Stage 3: masked inputs.
    req3 = {nid: MaskedInputRequest.from_dict(server.masked_input_request(nid).to_dict()) for nid in node_ids}
    # Timing repeats of the complete masking stage on copies of site 0's state (see best_of); in a
    # representative cell these are the only complete masking runs.
    rep_id, rep_x = node_ids[0], inputs.get(node_ids[0])
    rep_bytes = 0

    def rep_once() -> float:
        nonlocal rep_bytes
        clone = SecAggSite.from_state(sites[rep_id].to_state(), ident[rep_id], pinned)
        t0 = time.perf_counter()
        content = _ours_masked_content(clone.masked_input(req3[rep_id], rep_x))
        elapsed = time.perf_counter() - t0
        rep_bytes = wire_bytes(content)
        return elapsed

    rep_samples = best_of(rep_once, budget_s=2.0 if representative else 1.0)
    masked: list[MaskedInput] = []
    server_sum_s = 0.0
    with _ours_without_pairwise_masks() if representative else contextlib.nullcontext():
        for nid in node_ids:
            x = inputs.get(nid)
            c = reply(
                nid, "masked_input", lambda s=sites[nid], x=x, r=req3[nid]: _ours_masked_content(s.masked_input(r, x))
            )
            # Server: decode each reply as it arrives (same work as decoding them all at the end, without
            # holding every encoded and decoded vector at once).
            t0 = time.perf_counter()
            masked.append(MaskedInput.from_dict(dict(c["header"]), c["masked"]["y"].numpy()))
            server_sum_s += time.perf_counter() - t0
            del c
    t0 = time.perf_counter()
    server.receive_masked_inputs(masked)
    server_sum_s += time.perf_counter() - t0
    del masked

    # Stage 4: every survivor signs the survivor view (the consistency round against a malicious server).
    req4 = ConsistencyRequest.from_dict(server.consistency_request().to_dict())
    signed = []
    for nid in node_ids:
        c = reply(
            nid,
            "consistency",
            lambda s=sites[nid]: RecordDict({"signature": ConfigRecord(s.consistency(req4).to_dict())}),
        )
        signed.append(SurvivorSignature.from_dict(dict(c["signature"])))
    server.receive_consistency(signed)

    # Stage 5: unmask shares (each site first checks t signatures on its view), then the server removes the masks.
    req5 = UnmaskRequest.from_dict(server.unmask_request().to_dict())
    unmask = []
    for nid in node_ids:
        c = reply(nid, "unmask", lambda s=sites[nid]: RecordDict({"unmask": ConfigRecord(s.unmask(req5).to_dict())}))
        unmask.append(UnmaskShares.from_dict(dict(c["unmask"])))
    aggregates: list[np.ndarray] = []

    def unmask_once() -> float:
        srv = copy.deepcopy(server)  # the server state machine runs its last two steps once per object
        t0 = time.perf_counter()
        srv.receive_unmask(unmask)
        agg = srv.aggregate()
        elapsed = time.perf_counter() - t0
        if not aggregates:
            aggregates.append(agg)
        return elapsed

    unmask_samples = best_of(unmask_once)
    aggregate = aggregates[0]

    abs_err = np.abs(aggregate - inputs.exact_sum)
    out: dict[str, Any] = {
        "masked_vector_dtype": "uint32",
        **_timings(tally, "masked_input", rep_samples, node_ids, representative, server_sum_s, unmask_samples),
        "binding_s": binding_s,
        "rel_l2_error": _rel_l2(aggregate, inputs.exact_sum),
        "max_abs_error": float(abs_err.max()),
        "expected_rel_l2": quant.typical_rel_l2(inputs.sigma),
        "worst_case_abs_error": quant.error_bound(n),
        "quant": {"clip_range": quant.clip_range, "scale": quant.scale, "modulus": 2**32},
    }
    if representative:
        out["representative"] = _representative(tally, "masked_input", node_ids, rep_bytes)
    if keep_messages:
        out["_messages"] = kept
        out["_stage_bytes"] = tally.bytes_by_stage
    return out


# ---------------------------------------------------------------- Flower side


class _Elided:
    """Marker returned instead of a pairwise mask while pairwise masks are elided."""


@contextlib.contextmanager
def _flower_without_pairwise_masks(self_seeds: set[bytes]) -> Iterator[None]:
    """Make the mod skip pairwise masks (seeds that are not a site's private-mask seed); see module docstring."""
    elided = _Elided()
    real_prg, real_add, real_sub = (
        FLOWER_MOD.pseudo_rand_gen,
        FLOWER_MOD.parameters_addition,
        FLOWER_MOD.parameters_subtraction,
    )

    def prg(seed: bytes, num_range: int, dims: list[tuple[int, ...]]) -> Any:
        return real_prg(seed, num_range, dims) if seed in self_seeds else elided

    def add(a: list[np.ndarray], b: Any) -> list[np.ndarray]:
        return a if b is elided else real_add(a, b)

    def sub(a: list[np.ndarray], b: Any) -> list[np.ndarray]:
        return a if b is elided else real_sub(a, b)

    with (
        mock.patch.object(FLOWER_MOD, "pseudo_rand_gen", prg),
        mock.patch.object(FLOWER_MOD, "parameters_addition", add),
        mock.patch.object(FLOWER_MOD, "parameters_subtraction", sub),
    ):
        yield


def flower_share_config(n_sites: int, num_shares: float, fraction: float) -> tuple[int, int]:
    """(num_shares, threshold) for ``SecAggPlusWorkflow(num_shares, reconstruction_threshold)``.

    num_shares is derived from the float fraction exactly as ``setup_stage`` does. On the complete graph the
    threshold is fedtune's own (an int ``reconstruction_threshold``), so both protocols tolerate the same
    dropouts; on a sparse graph it is the workflow's float rule, round(fraction * num_shares), at least 2.
    """
    shares = round(num_shares * n_sites)
    if shares < n_sites and shares & 1 == 0:
        shares += 1
    if shares <= 2:
        shares = n_sites
    if shares >= n_sites:
        return shares, threshold_for(n_sites, fraction)
    return shares, max(round(fraction * shares), 2)


def _flower_neighbours(node_ids: Sequence[int], num_shares: int, seed: int) -> dict[int, set[int]]:
    # The workflow shuffles the sampled ids and makes each node's neighbours the num_shares//2 ids on either side.
    order = list(node_ids)
    random.Random(seed).shuffle(order)
    half = num_shares >> 1
    return {nid: {order[(i + off) % len(order)] for off in range(-half, half + 1)} for i, nid in enumerate(order)}


def _flower_unmask(
    masked_sum: list[np.ndarray],
    shares_by_owner: dict[int, list[bytes]],
    active: set[int],
    threshold: int,
    clipping_range: float,
    quantization_range: int,
    mod_range: int,
) -> np.ndarray:
    """The computation of ``SecAggPlusWorkflow.unmask_stage`` after the replies arrive (no dropouts here)."""
    shapes = get_parameters_shape(masked_sum)
    vec = masked_sum
    for owner, share_list in shares_by_owner.items():
        if owner not in active:
            raise NotImplementedError("the benchmark has no dropouts; a dropped owner would need pairwise unmasking")
        if len(share_list) < threshold:
            raise RuntimeError(f"only {len(share_list)} shares for node {owner}, threshold {threshold}")
        seed = combine_shares(share_list)
        vec = parameters_subtraction(vec, pseudo_rand_gen(seed, mod_range, shapes))
    vec = parameters_mod(vec, mod_range)
    q_total_ratio, vec = factor_extract(vec)
    out = dequantize(vec, clipping_range, quantization_range)
    offset = -(len(active) - 1) * clipping_range
    scale = quantization_range / q_total_ratio
    return (out[0] + offset) * scale


def run_flower(
    inputs: SiteInputs,
    node_ids: Sequence[int],
    settings: BenchSettings,
    *,
    representative: bool = False,
    keep_messages: bool = False,
) -> dict[str, Any]:
    """One Flower SecAgg+ round over ``inputs`` through the mod's stage functions; returns metrics."""
    n = len(node_ids)
    num_shares, threshold = flower_share_config(n, settings.flower_num_shares, settings.threshold_fraction)
    neighbours = _flower_neighbours(node_ids, num_shares, settings.seed)
    mod_range = settings.flower_modulus_range
    qrange = settings.flower_quantization_range or (mod_range - 1) // n
    clip = float(settings.flower_clipping_range)
    setup = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: num_shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: clip,
        Key.TARGET_RANGE: qrange,
        Key.MOD_RANGE: mod_range,
        Key.MAX_WEIGHT: float(settings.flower_max_weight),
    }
    num_examples = int(settings.flower_max_weight)  # weight ratio 1 for every site: Flower's mean * n == sum
    states: dict[int, Any] = {}
    tally = _Tally.new(node_ids)
    kept: dict[int, dict[str, RecordDict]] = {nid: {} for nid in node_ids}

    def reply(nid: int, stage: str, fn: Callable[[ConfigRecord], dict], cfg: ConfigRecord) -> RecordDict:
        t0 = time.perf_counter()
        FLOWER_MOD.check_configs(stage, cfg)  # the mod validates every incoming ConfigRecord the same way
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(fn(cfg), False)})
        tally.secs_by_stage[nid][stage] = time.perf_counter() - t0
        tally.bytes_by_stage[nid][stage] = wire_bytes(content)
        if keep_messages:
            kept[nid][stage] = content
        return content

    # Stage 0 (setup): two key pairs per site.
    pubkeys: dict[int, list[bytes]] = {}
    for nid in node_ids:
        st = FLOWER_MOD.SecAggPlusState()
        st.nid = nid
        states[nid] = st
        c = reply(nid, Stage.SETUP, lambda cfg, st=st: FLOWER_MOD._setup(st, cfg), ConfigRecord(dict(setup)))
        res = c[RECORD_KEY_CONFIGS]
        pubkeys[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
    active = set(node_ids)

    # Stage 1 (share keys): server forwards neighbours' keys, sites return encrypted shares for routing.
    fwd_ct: dict[int, list[bytes]] = {nid: [] for nid in node_ids}
    fwd_src: dict[int, list[int]] = {nid: [] for nid in node_ids}
    for nid in node_ids:
        cfg = ConfigRecord({str(j): pubkeys[j] for j in neighbours[nid] & active})
        c = reply(nid, Stage.SHARE_KEYS, lambda cfg, st=states[nid]: FLOWER_MOD._share_keys(st, cfg), cfg)
        res = c[RECORD_KEY_CONFIGS]
        for dst, ctxt in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
            fwd_ct[dst].append(ctxt)
            fwd_src[dst].append(nid)

    # Stage 2 (collect masked vectors): the fit result goes in as legacy Parameters, as the mod receives it.
    def stage2_cfg(nid: int) -> ConfigRecord:
        return ConfigRecord({Key.CIPHERTEXT_LIST: fwd_ct[nid], Key.SOURCE_LIST: fwd_src[nid]})

    # Timing repeats on copies of site 0's state, as for fedtune.
    rep_id = node_ids[0]
    rep_params = ndarrays_to_parameters([inputs.get(rep_id)])
    rep_bytes = 0

    def rep_once() -> float:
        nonlocal rep_bytes
        st, cfg = copy.deepcopy(states[rep_id]), stage2_cfg(rep_id)
        t0 = time.perf_counter()
        FLOWER_MOD.check_configs(Stage.COLLECT_MASKED_VECTORS, cfg)
        res = FLOWER_MOD._collect_masked_vectors(st, cfg, num_examples, rep_params)
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(res, False)})
        elapsed = time.perf_counter() - t0
        rep_bytes = wire_bytes(content)
        return elapsed

    rep_samples = best_of(rep_once, budget_s=2.0 if representative else 1.0)
    masked_sum: list[np.ndarray] | None = None
    server_sum_s = 0.0
    self_seeds = {st.rd_seed for st in states.values()}
    with _flower_without_pairwise_masks(self_seeds) if representative else contextlib.nullcontext():
        for nid in node_ids:
            params = ndarrays_to_parameters([inputs.get(nid)])
            c = reply(
                nid,
                Stage.COLLECT_MASKED_VECTORS,
                lambda cfg, st=states[nid], p=params: FLOWER_MOD._collect_masked_vectors(st, cfg, num_examples, p),
                stage2_cfg(nid),
            )
            del params
            # Server: sum as the replies arrive (the workflow sums after collecting them all; same arithmetic).
            t0 = time.perf_counter()
            vec = [bytes_to_ndarray(b) for b in c[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
            server_sum_s += time.perf_counter() - t0
            del c, vec
    assert masked_sum is not None
    t0 = time.perf_counter()
    masked_sum = parameters_mod(masked_sum, mod_range)
    server_sum_s += time.perf_counter() - t0

    # Stage 3 (unmask): sites send the seed shares of their active neighbours; the server removes the masks.
    shares_by_owner: dict[int, list[bytes]] = {nid: [] for nid in node_ids}
    for nid in node_ids:
        cfg = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: sorted(neighbours[nid] & active), Key.DEAD_NODE_ID_LIST: []})
        c = reply(nid, Stage.UNMASK, lambda cfg, st=states[nid]: FLOWER_MOD._unmask(st, cfg), cfg)
        res = c[RECORD_KEY_CONFIGS]
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            shares_by_owner[owner].append(share)
    means: list[np.ndarray] = []

    def unmask_once() -> float:
        t0 = time.perf_counter()
        mean = _flower_unmask(
            masked_sum,
            shares_by_owner,
            active,
            threshold,
            clip,
            qrange,
            mod_range,
        )
        elapsed = time.perf_counter() - t0
        if not means:
            means.append(mean)
        return elapsed

    unmask_samples = best_of(unmask_once)
    mean = means[0]

    exact_mean = inputs.exact_sum / n
    stage = Stage.COLLECT_MASKED_VECTORS
    step = 2 * clip / qrange
    out: dict[str, Any] = {
        "masked_vector_dtype": "int64",
        **_timings(tally, stage, rep_samples, node_ids, representative, server_sum_s, unmask_samples),
        "rel_l2_error": _rel_l2(mean, exact_mean),
        "max_abs_error": float(np.abs(mean - exact_mean).max() * n),  # on the sum's scale, like ours
        "expected_rel_l2": step / (math.sqrt(6.0) * inputs.sigma),
        "num_shares": num_shares,
        "threshold": threshold,
        "quant": {"clipping_range": clip, "quantization_range": qrange, "modulus_range": mod_range},
    }
    if representative:
        out["representative"] = _representative(tally, stage, node_ids, rep_bytes)
    if keep_messages:
        out["_messages"] = kept
        out["_stage_bytes"] = tally.bytes_by_stage
    return out


# ---------------------------------------------------------------- cells and grid


def _estimate_peak_bytes(n_params: int, n_sites: int) -> int:
    # fedtune's server holds every decoded uint32 masked vector before summing; Flower keeps ~12 int64/float64
    # temporaries of one site at a time; inputs are cached up to cache_limit_bytes.
    return n_sites * n_params * 4 + 12 * n_params * 8 + min(n_sites * n_params * 8, BenchSettings.cache_limit_bytes)


def run_cell(
    n_params: int,
    n_sites: int,
    settings: BenchSettings,
    *,
    representative: bool | None = None,
    keep_messages: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run both protocols on one (params, sites) cell; ``representative=None`` picks by ``settings.full_budget``."""
    cell: dict[str, Any] = {
        "n_params": n_params,
        "n_sites": n_sites,
        "label": f"{size_label(n_params)} x {n_sites}",
        "threshold": threshold_for(n_sites, settings.threshold_fraction),
    }
    need, have = _estimate_peak_bytes(n_params, n_sites), _available_memory()
    if need > 0.8 * have:
        cell.update(mode="skipped", reason=f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available")
        return cell
    if representative is None:
        representative = n_sites**2 * n_params > settings.full_budget
    cell["mode"] = "representative" if representative else "full"
    node_ids = [1000 + 7 * i for i in range(n_sites)]
    t0 = time.perf_counter()
    inputs = SiteInputs(n_params, node_ids, settings.sigma, settings.seed, settings.cache_limit_bytes)
    for name, fn in (
        ("ours", lambda: run_ours(inputs, node_ids, cell["threshold"], settings.clip_range,
                                  representative=representative, keep_messages=keep_messages)),
        ("flower", lambda: run_flower(inputs, node_ids, settings, representative=representative,
                                      keep_messages=keep_messages)),
    ):  # fmt: skip
        t1 = time.perf_counter()
        try:
            cell[name] = fn()
        except Exception as exc:  # a failing side is reported in the table, not hidden by a crash
            cell[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  {cell['label']:>10} {name:<6} {time.perf_counter() - t1:7.1f} s")
    if "error" in cell["ours"] or "error" in cell["flower"]:
        cell["mode"] = "skipped"
        cell["reason"] = "; ".join(f"{k}: {cell[k]['error']}" for k in ("ours", "flower") if "error" in cell[k])
    else:
        cell["ratios"] = {m: _ratio(cell["ours"][m], cell["flower"][m]) for m in RATIO_METRICS}
    cell["wall_s"] = time.perf_counter() - t0
    return cell


def _ratio(a: float, b: float) -> float | None:
    return None if not b else a / b


def ratio_summary(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: the ours / Flower ratio of every measured cell, plus min, max and geometric mean."""
    out: dict[str, Any] = {}
    for metric in RATIO_METRICS:
        by_cell = {c["label"]: c["ratios"][metric] for c in cells if "ratios" in c and c["ratios"][metric]}
        vals = list(by_cell.values())
        out[metric] = {
            "by_cell": by_cell,
            "min": min(vals) if vals else None,
            "max": max(vals) if vals else None,
            "geomean": float(np.exp(np.mean(np.log(vals)))) if vals else None,
        }
    return out


def _versions() -> dict[str, str]:
    import cryptography
    import flwr

    out = {"python": platform.python_version(), "numpy": np.__version__, "flwr": flwr.__version__}
    out["cryptography"] = cryptography.__version__
    with contextlib.suppress(ImportError):
        import Crypto

        out["pycryptodome"] = Crypto.__version__
    return out


def run_grid(
    sizes: Sequence[int],
    site_counts: Sequence[int],
    settings: BenchSettings,
    *,
    force_full: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Every (size, sites) cell, both protocols, into one JSON-ready dict with a ratios block."""
    t0 = time.perf_counter()
    cells = [
        run_cell(p, s, settings, representative=False if force_full else None, log=log)
        for p in sizes
        for s in site_counts
    ]
    return {
        "benchmark": "secagg",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **_versions()},
        "settings": asdict(settings),
        "method": {
            "ours": "fedtune SecAggSite/SecAggServer driven stage by stage in-process; messages as Flower records",
            "flower": (
                "Flower 1.42 secaggplus_mod stage functions (_setup, _share_keys, _collect_masked_vectors, _unmask) "
                "called in-process; SecAggPlusWorkflow's server steps replayed with Flower's own functions"
            ),
            "upload_bytes": "sum of deflate() sizes of the reply RecordDict's inflatable objects (Flower 1.42 wire)",
            "representative": (
                "one site's full masking stage timed (x sites for totals); all sites then mask with pairwise masks "
                "elided (they cancel mod 2**32), so sum, server work and error are those of a full run"
            ),
        },
        "cells": cells,
        "ratios": ratio_summary(cells),
        "elapsed_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------- output


def _mb(b: float) -> str:
    return f"{b / 1e6:.3g}"


def _s(x: float) -> str:
    return f"{x:.3g}"


def _e(x: float) -> str:
    return f"{x:.2e}"


def _r(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.3g}" if 1e-3 <= x < 1e4 else f"{x:.2e}")


def _qrange_label(q: int) -> str:
    if not q:
        return "(2^32 - 1) // n"
    return f"2^{int(math.log2(q))}" if q & (q - 1) == 0 else str(q)


def render_markdown(result: dict[str, Any]) -> str:
    """Markdown: the per-cell table (ours | Flower | ratio for each metric), the ratio summary and the settings."""
    s, m = result["settings"], result["machine"]
    defaults = BenchSettings()
    is_default = (s["flower_clipping_range"], s["flower_quantization_range"]) == (
        defaults.flower_clipping_range,
        defaults.flower_quantization_range,
    )
    flower_kind = "its defaults" if is_default else "NOT its defaults"
    head = (
        "| adapter | sites | t | mode "
        "| upload MB/site ours | Flower | ratio "
        "| mask s/site ours | Flower | ratio "
        "| unmask s ours | Flower | ratio "
        "| rel. L2 err ours | Flower | ratio |"
    )
    lines = [head, "|" + "---|" * 16]
    for c in result["cells"]:
        pre = f"| {size_label(c['n_params'])} | {c['n_sites']} | {c['threshold']} |"
        if c["mode"] == "skipped":
            lines.append(f"{pre} skipped ({c['reason']}) |" + " |" * 12)
            continue
        o, f, r = c["ours"], c["flower"], c["ratios"]
        mode = "full" if c["mode"] == "full" else "rep."
        lines.append(
            f"{pre} {mode} "
            f"| {_mb(o['upload_bytes_per_site'])} | {_mb(f['upload_bytes_per_site'])} "
            f"| {_r(r['upload_bytes_per_site'])} "
            f"| {_s(o['client_mask_s'])} | {_s(f['client_mask_s'])} | {_r(r['client_mask_s'])} "
            f"| {_s(o['server_unmask_s'])} | {_s(f['server_unmask_s'])} | {_r(r['server_unmask_s'])} "
            f"| {_e(o['rel_l2_error'])} | {_e(f['rel_l2_error'])} | {_r(r['rel_l2_error'])} |"
        )
    lines += [
        "",
        "Consistency round (ours only; the defence against a malicious server that shows sites different survivor "
        "lists): bytes a site uploads for its signature, and its time to check and sign, per cell:",
        "",
        "| adapter | sites | consistency B/site | share of upload | consistency s/site | unmask s/site "
        "| binding s/site | binding / masking |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        if c["mode"] == "skipped":
            continue
        o = c["ours"]
        cb, total = o["upload_bytes_by_stage"]["consistency"], o["upload_bytes_per_site"]
        lines.append(
            f"| {size_label(c['n_params'])} | {c['n_sites']} | {cb:.0f} | {cb / total:.1e} "
            f"| {_s(o['client_other_stages_s']['consistency'])} | {_s(o['client_other_stages_s']['unmask'])} "
            f"| {_s(o['binding_s'])} | {o['binding_s'] / o['client_mask_s']:.3f} |"
        )
    lines += [
        "",
        "Binding: each site's SHA-256 digest of the round's first message (round config with a federation spec, and "
        "the adapter), signed in its advert and consistency signature, so that sites sent different specs or "
        "adapters cannot complete a round together.",
    ]
    lines += ["", "Ratios ours / Flower over measured cells (geometric mean [min, max]):", ""]
    for metric, label in RATIO_METRICS.items():
        q = result["ratios"][metric]
        if q["geomean"] is not None:
            lines.append(f"- {label}: {_r(q['geomean'])} [{_r(q['min'])}, {_r(q['max'])}]")
    lines += [
        "",
        f"Inputs: N(0, {s['sigma']:g}) float64 per site, same vectors for both. Ours: QuantSpec(clip_range="
        f"{s['clip_range']:g}), uint32, modulus 2^32. Flower SecAgg+ ({flower_kind}): clipping_range "
        f"{s['flower_clipping_range']:g}, quantization_range {_qrange_label(s['flower_quantization_range'])}, "
        f"modulus_range 2^{int(math.log2(s['flower_modulus_range']))}, int64 masked vectors, num_shares = "
        f"{s['flower_num_shares']:g} x sites. Threshold t = the least integer above {s['threshold_fraction']:.3g} n "
        "(fedtune's site floor) for both; no dropouts.",
        "Timings: fastest sample (repeats on a copy of site 0, plus every site in 'full' cells); machine shared.",
    ]
    if any(c["mode"] == "representative" for c in result["cells"]):
        lines.append(
            "Mode 'rep.': masking time of one representative site (identical work per site); the other sites' "
            "pairwise masks were elided for the aggregate (they cancel mod 2^32), so unmasking time and error are "
            "full-run values."
        )
    lines += [
        f"Machine: {m['cpus']} CPUs, {m['platform']}; flwr {m['flwr']}; total wall {result['elapsed_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _strip_private(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_strip_private(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see ``--help``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="75k/1M params x 2/10 sites (< 2 min)")
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="parameter counts, e.g. 75k 1M 14M")
    ap.add_argument("--sites", nargs="+", type=int, help="site counts, e.g. 2 10 50")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--sigma", type=float, default=BenchSettings.sigma, help="std of the synthetic site inputs")
    ap.add_argument("--clip", type=float, default=BenchSettings.clip_range, help="fedtune QuantSpec clip_range")
    ap.add_argument(
        "--flower-num-shares", type=float, default=BenchSettings.flower_num_shares,
        help="SecAgg+ num_shares as a fraction of the sites (1.0 = complete graph, like fedtune)",
    )  # fmt: skip
    ap.add_argument(
        "--full-budget", type=float, default=BenchSettings.full_budget,
        help="sites^2 x params above which masking time is taken from one representative site",
    )  # fmt: skip
    ap.add_argument(
        "--flower-clip", type=float, default=BenchSettings.flower_clipping_range,
        help="Flower clipping_range (its default 8.0)",
    )  # fmt: skip
    ap.add_argument(
        "--flower-qrange", type=int, default=BenchSettings.flower_quantization_range,
        help="Flower quantization_range (its default 2**22); 0 = (2**32 - 1) // sites, the finest that cannot overflow",
    )  # fmt: skip
    ap.add_argument("--force-full", action="store_true", help="never use representative mode")
    ap.add_argument("--seed", type=int, default=BenchSettings.seed)
    args = ap.parse_args(argv)

    if args.quick:
        sizes, sites = [SIZES[k] for k in QUICK_SIZES], list(QUICK_SITES)
    else:
        sizes, sites = list(SIZES.values()), list(FULL_SITES)
    sizes, sites = args.sizes or sizes, args.sites or sites
    settings = BenchSettings(
        sigma=args.sigma,
        clip_range=args.clip,
        flower_num_shares=args.flower_num_shares,
        flower_clipping_range=args.flower_clip,
        flower_quantization_range=args.flower_qrange,
        full_budget=args.full_budget,
        seed=args.seed,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"secagg benchmark: sizes {[size_label(p) for p in sizes]} x sites {sites}")
    result = run_grid(sizes, sites, settings, force_full=args.force_full, log=log)
    result["argv"] = list(sys.argv[1:] if argv is None else argv)
    md = render_markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_strip_private(result), indent=2) + "\n")
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
