"""The site's side of distributed noise: one masked, noised gradient sum per DP step of the head phase.

A session (one per run, or a fresh one after a site dropped) starts with a signed advert; every later message
is one DP step: Poisson-sample the site's rows at the federation's rate, clip each row's gradient of the head,
round it to integers (conditional randomized rounding), add this site's share of the step's discrete Gaussian
noise, mask. The first step of each round charges the ledger for the round's steps at the noise the sum carries
if `min_honest_sites` sites are honest, and records beside it the noise of this site's share alone.

What the site decides alone (never the server): whether it takes part (`min_honest_sites` set), its share of the
noise (from its own h), the smallest session it joins, its cap, which rows it samples (its own randomness). What
the server chooses (sigma, the rate, the steps, the model of each step) is bound: sigma and the federation into
the session digest every site signs, each step's message into that step's masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from torch.utils.data import TensorDataset

from fedtune.client.secure_site import identity_key, pinned_peers, round_digest, used_tags
from fedtune.client.site import Declined, Site, encoder_key
from fedtune.client.tasks import EvalResult
from fedtune.common.adapter import AdapterState, check_received, from_record, load_adapter_state
from fedtune.common.config import MAX_NOISE_MULTIPLIER, FederationSpec, SiteSpec
from fedtune.common.noise import (
    CLIP_UNITS,
    MAX_TAU,
    RING_BITS,
    NoiseError,
    charged_noise_multiplier,
    conditional_round,
    discrete_gaussian,
    rounded_norm_bound,
    share_scale,
    sum_tau,
    to_ring,
    worst_noise_multiplier,
)
from fedtune.common.recipe import select, step_range, trained_keys
from fedtune.common.secagg import scores
from fedtune.common.secagg.errors import SecAggIntegrityError
from fedtune.common.secagg.stepsum import StepAdvert, StepSumSite, step_binding

log = logging.getLogger(__name__)

_STATE = "dstep-state"
ROW_CHUNK = 256  # per-example gradients are materialised this many rows at a time


def session_digest(spec: FederationSpec, run: str, session: bytes, noise_multiplier: float) -> bytes:
    """What every site of a session signs: the federation (rate, steps, clip, model), the run, the session and
    sigma. Sites shown different values derive different masks, and their sum is noise."""
    h = hashlib.sha256(b"fedtune/distributed-session")
    for part in (spec.model_dump_json(), run, session.hex(), repr(float(noise_multiplier))):
        h.update(len(part).to_bytes(8, "big") + part.encode())
    return h.digest()


def _require_opt_in(site: SiteSpec, spec: FederationSpec) -> int:
    if site.min_honest_sites is None:
        raise SecAggIntegrityError(
            f"site {site.name} has not opted into distributed noise (`min_honest_sites` in its site file); the "
            "operator should run with privacy.noise = 'local', or the site state how many honest sites it assumes"
        )
    if spec.privacy.noise != "distributed":
        raise SecAggIntegrityError("a distributed-noise message in a federation whose privacy.noise is not it")
    return site.min_honest_sites


def advertise(message: Message, context: Context, site: SiteSpec) -> StepAdvert:
    """Open a session: a fresh X25519 key, signed over the session digest and this site's h. A session id is
    answered once, ever."""
    spec = _spec(message)
    honest = _require_opt_in(site, spec)
    req, run = message.content["dsession"], str(message.content["config"]["run"])
    session = bytes.fromhex(str(req["session"]))
    sigma = float(req["noise-multiplier"])
    if not 0 < sigma <= MAX_NOISE_MULTIPLIER:  # NaN fails too; past the top a step is free (see common/config.py)
        raise SecAggIntegrityError(
            f"a noise multiplier of {sigma} is outside (0, {MAX_NOISE_MULTIPLIER:g}], the noise a site composes"
        )
    used_tags(site).claim_line(f"dsession:{session.hex()}")
    digest = session_digest(spec, run, session, sigma)
    state, advert = StepSumSite.open(
        message.metadata.dst_node_id,
        site.name,
        identity_key(site),
        session=session,
        digest=digest,
        honest=honest,
        scores=site.secure_scores,
        score_min=max(honest, site.min_round_sites),
    )
    context.state[_STATE] = ConfigRecord({"site": state.to_state(), "sigma": sigma, "run": run, "charged": []})
    return advert


def _spec(message: Message) -> FederationSpec:
    return FederationSpec.model_validate_json(str(message.content["config"]["federation"]))


@dataclass(frozen=True)
class StepOut:
    masked: np.ndarray  # uint32: the head's gradient sum plus this site's noise share, then its row count, masked
    ledger_run: str  # the run id the site's ledger charges this session's rounds to
    epsilon: float | None = None  # where this step charged its round: the epsilon under the h assumption
    worst_epsilon: float | None = None  # and the one of the site's own shares alone
    result: EvalResult | None = None  # the site's held-out figures of the model sent, where it scored it
    declined: str | None = None  # why this step carries only the site's noise share (its public reason)


def step(message: Message, context: Context, site: Site, *, may_score: bool = False) -> StepOut:
    """One DP step of the session this site opened. The first step of a round also carries, in its last
    `scores.LENGTH` coordinates, the site's exact held-out figures of the model it was sent, where the site's file
    sets `secure_scores`, the metering allows (`may_score`), the site trains this round, and the session's scorers
    reach every scorer's signed minimum (zeros otherwise; see `StepSumSite.mask` for why they then decode only if
    every scorer brings its own)."""
    own, spec = site.site, site.spec
    honest = _require_opt_in(own, spec)
    if _STATE not in context.state:
        raise SecAggIntegrityError("a distributed step for a session this site did not open")
    saved = context.state[_STATE]
    session = StepSumSite.from_state(str(saved["site"]))
    sigma, run, charged_rounds = float(saved["sigma"]), str(saved["run"]), list(saved["charged"])
    encoder = str(saved.get("encoder", ""))
    cfg, req = message.content["config"], message.content["dstep"]
    k, round_ = int(req["step"]), int(cfg["round"])
    if str(req["session"]) != session.session or str(cfg["run"]) != run:
        raise SecAggIntegrityError("the step names another session or run than the one this site opened")
    # the federation as the message carries it, as `advertise` signed it (the site's own spec differs where the
    # site names its own copy of the base model)
    if session_digest(_spec(message), run, bytes.fromhex(session.session), sigma).hex() != session.digest:
        # the rate and steps a round is charged for are the session's: a spec changed mid-session is refused
        raise SecAggIntegrityError("the step's federation is not the one this site signed for the session")
    steps = step_range(spec, round_)
    if k not in steps:
        raise SecAggIntegrityError(f"step {k} is not a step of round {round_}")
    if "adverts" in req:
        adverts = [StepAdvert.from_dict(json.loads(a)) for a in req["adverts"]]  # type: ignore[union-attr]
        session.join(adverts, pinned_peers(own), min_sites=max(honest, own.min_round_sites))
    if session.peers_honest is None:
        raise SecAggIntegrityError("the step came before the session's roster; refusing it")
    others = list(session.peers_honest.values())
    if "global" in message.content:  # a session's and a round's first step: the whole adapter, the encoder with it
        sent = message.content["global"]
        global_state = from_record(sent)
        site.accept(global_state)  # this site's keys and shapes, bounded values: refused before a row is read
        load_adapter_state(site.loaded.model, global_state)  # the features are the encoder's this adapter has
        features, _ = site.features(global_state)
        encoder = encoder_key(global_state)
        head = select(global_state, trained_keys(global_state, spec, "head"))
        layout = json.dumps([[name, list(value.shape)] for name, value in head.items()])
    else:  # the head only, under the encoder of the session's last whole adapter, in its layout
        sent, global_state, layout = message.content["head"], None, str(saved.get("layout", "[]"))
        template = {name: np.zeros(shape, dtype=np.float32) for name, shape in json.loads(layout)}
        if not template:
            raise SecAggIntegrityError("a head-only step before this session sent the whole adapter")
        head = from_record(sent)
        check_received(head, template)  # the session's head tensors and shapes, bounded values, or refused
        stored = site.features_under(encoder) if encoder else None
        if stored is None:
            raise SecAggIntegrityError("a head-only step without this session's encoder features; open a new session")
        features = stored[0]
    _require_linear_head(head)
    bound = rounded_norm_bound(CLIP_UNITS, sum(v.size for v in head.values()))
    scale = share_scale(sigma, bound, honest)
    sites = len(others) + 1
    if sum_tau([scale] * sites) > MAX_TAU:
        raise NoiseError(f"noise shares of {scale:.1f} integer units are too coarse to sum to a discrete Gaussian")
    limit = _coordinate_limit(scale, sites)  # from the message alone, before any row
    epsilon, declined, ledger_run = None, None, f"{run}.{session.session}"
    if round_ not in charged_rounds:
        d = spec.training.head.distributed
        try:
            spend = site.commit_spend(
                ledger_run,
                round_,
                spec.training.rounds,
                fixed=(charged_noise_multiplier(sigma, honest, others), d.sample_rate, len(steps)),
                worst=worst_noise_multiplier(sigma, honest),
            )
            epsilon = spend.epsilon_after
            charged_rounds.append(round_)
        except Declined as exc:  # noise without data costs nothing, and keeps the others' step alive
            log.warning("%s; this site's steps of round %d carry only its noise share", exc, round_)
            declined = exc.public
    with_data = declined is None
    rng = _rng(own, session.session, k)
    total = _gradient_sum(site, features, head, bound, rng) if with_data else np.zeros(_dim(head), np.int64)
    total = np.clip(total, -limit, limit)  # a projection: one row still moves the vector by at most `bound`
    scoring = with_data and may_score and k == steps.start and global_state is not None  # once per trained round
    secure = scoring and session.release_scores  # every scorer then brings its figures, or none decode
    wanted = (secure or (scoring and own.share_eval_metrics)) and site.release_scores(run, round_ - 1)
    result = site.evaluate(global_state, prior=False) if wanted else None
    figures = _figures(site, result, sites) if secure and result else np.zeros(scores.LENGTH, dtype=np.int64)
    count = _count(site) if with_data else 0
    exact = np.concatenate([[count], figures])  # noiseless, each at most weight_cap (loss: `scores.loss_units`)
    vector = np.concatenate([total + discrete_gaussian(scale, total.size, prefetch=True), exact])
    binding = step_binding(session.session, k, [round_digest(cfg, sent), encoder.encode()])
    brought = scores.LENGTH if secure and result is not None else 0
    masked = session.mask(k, binding, to_ring(vector), used_tags(own).claim_line, figures=brought)
    context.state[_STATE] = ConfigRecord(
        {
            "site": session.to_state(),
            "sigma": sigma,
            "run": run,
            "charged": charged_rounds,
            "encoder": encoder,
            "layout": layout,
        }
    )
    if epsilon is None:
        return StepOut(masked, ledger_run, result=result, declined=declined)
    worst = site.ledger.worst_epsilon(site.identity, site.delta, spec.privacy.accountant)
    return StepOut(masked, ledger_run, epsilon, worst, result)


def _figures(site: Site, result: EvalResult, sites: int) -> np.ndarray:
    """Held-out figures as integers (no label prior): correct answers, rows and the loss in `scores.loss_units`,
    rows counted up to `secagg.weight_cap` and the loss per row up to `scores.LOSS_CAP`, as local rounds do."""
    if result.num_examples <= 0:
        return np.zeros(scores.LENGTH, dtype=np.int64)
    rows = min(result.num_examples, site.spec.secagg.weight_cap)
    correct = round((result.accuracy or 0.0) * rows)
    per_row = min(result.loss, scores.LOSS_CAP) if math.isfinite(result.loss) else scores.LOSS_CAP  # as `encode`
    loss = round(per_row * rows * scores.loss_units(sites, site.spec.secagg.weight_cap))
    return np.array([correct, rows, loss], dtype=np.int64)


def _count(site: Site) -> int:
    """The site's weight in the expected batch, as local-noise rounds weigh it: its rows, capped."""
    return min(len(site.train_data), site.spec.secagg.weight_cap)


def _coordinate_limit(scale: float, sites: int) -> int:
    """How far a coordinate of this site's gradient sum may go so that the session's sum cannot wrap modulo 2^32:
    the ring's half over the sites, less each noise share's tail (20 standard deviations: e^-200). Computed from the
    message alone, and the sum is clamped to it: a refusal that depended on the site's row count would tell it
    (a server choosing sigma could search for it), and clamping coordinates never moves a vector further apart."""
    limit = int(2 ** (RING_BITS - 1) / sites - 20 * scale)
    if limit < CLIP_UNITS:
        raise NoiseError("noise shares this large cannot sum in 32 bits among this many sites: lower the noise")
    return limit


def _dim(head: AdapterState) -> int:
    return sum(v.size for v in head.values())


def _rng(site: SiteSpec, session: str, step_: int) -> np.random.Generator:
    """Sampling and rounding randomness: fresh OS entropy, or (a seeded simulation site) the seed and the step."""
    if site.seed is None:
        return np.random.default_rng(secrets.randbits(128))
    digest = hashlib.sha256(f"{site.seed}:dstep:{session}:{step_}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def _require_linear_head(head: AdapterState) -> None:
    """One weight (labels x features) and at most one bias (labels): the head `_gradient_sum` differentiates in
    closed form. Checked before the round is charged (review round 8: another head was paid for, then failed)."""
    weights = [v for v in head.values() if v.ndim == 2]
    biases = [v for v in head.values() if v.ndim == 1]
    if len(weights) != 1 or len(biases) > 1 or len(head) != len(weights) + len(biases):
        raise SecAggIntegrityError("distributed noise needs a one-Linear classifier head; this model's is not one")
    if biases and biases[0].shape[0] != weights[0].shape[0]:
        raise SecAggIntegrityError("the head's bias does not match its weight's rows")


def _gradient_sum(
    site: Site, features: TensorDataset, head: AdapterState, bound: float, rng: np.random.Generator
) -> np.ndarray:
    """Sum over a Poisson sample (rate q) of the site's rows of each row's head gradient, clipped to C, scaled
    to CLIP_UNITS and conditionally rounded: the integer vector whose sensitivity to one row is `bound`.

    The head is linear (logits = W x + b), so a row's gradient of the cross-entropy is (p - y) x^T for W and
    p - y for b, computed in closed form for each row (the per-sample gradients Opacus' hooks would give).
    """
    spec = site.spec
    x_all, y_all = features.tensors
    chosen = np.flatnonzero(rng.random(len(x_all)) < spec.training.head.distributed.sample_rate)
    weight = next(torch.from_numpy(v).float() for v in head.values() if v.ndim == 2)
    # a decoder's classifier (`score`) has no bias: its gradient then has the weight's part only
    bias = next((torch.from_numpy(v).float() for v in head.values() if v.ndim == 1), None)
    clip = spec.privacy.max_grad_norm
    total = np.zeros(_dim(head), dtype=np.int64)
    for start in range(0, len(chosen), ROW_CHUNK):
        idx = torch.from_numpy(chosen[start : start + ROW_CHUNK])
        x, y = x_all[idx].float(), y_all[idx]
        err = torch.softmax(x @ weight.T + (0.0 if bias is None else bias), dim=1)
        err[torch.arange(len(y)), y] -= 1.0
        norms = err.norm(dim=1) * torch.sqrt(x.square().sum(dim=1) + (0.0 if bias is None else 1.0))
        # A row whose gradient is not finite adds nothing (still a contribution of norm at most C): the step
        # must not fail, or differ in any way but its sum, because of what one row holds.
        factor = torch.where(torch.isfinite(norms), (clip / norms).clamp(max=1.0) * (CLIP_UNITS / clip), 0.0)
        parts = []
        for value in head.values():
            grad = torch.einsum("bl,bf->blf", err, x) if value.ndim == 2 else err
            parts.append(grad.reshape(len(y), -1))
        rows = torch.nan_to_num(torch.cat(parts, dim=1), nan=0.0, posinf=0.0, neginf=0.0) * factor[:, None]
        rows = rows.numpy()
        total += conditional_round(rows, bound, rng).sum(axis=0, dtype=np.int64)
    return total
