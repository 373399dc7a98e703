"""The fedtune ClientApp: Flower messages in, site decisions out.

The same app runs in simulation (sites resolved from the partition id) and in
deployment (the SuperNode's `--node-config site-config=PATH`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pydantic import ValidationError

from fedtune.client import distributed, secure_site
from fedtune.client.ledger import DuplicateRound, LedgerError, PrivacyLedger
from fedtune.client.scoring import MeterRefused, ScoreMeter
from fedtune.client.site import LEDGER_REFUSED, Declined, Site, egress_log, get_site, local_spec, reported_epsilon
from fedtune.client.tasks import EvalResult
from fedtune.common.adapter import AdapterRefused, flatten, from_record, num_parameters, to_record
from fedtune.common.config import FederationSpec, SiteSpec, load_site
from fedtune.common.model import BaseModelError, verify_fingerprint
from fedtune.common.recipe import phase_of, select, trained_keys
from fedtune.common.secagg import scores
from fedtune.common.secagg.errors import SecAggError, short_reason
from fedtune.common.secagg.messages import ROLE_SCORES, ROLE_UPDATE
from fedtune.common.secagg.weighting import pack, site_weight

log = logging.getLogger(__name__)

SiteResolver = Callable[[Context], SiteSpec]


def site_from_node_config(context: Context) -> SiteSpec:
    path = context.node_config.get("site-config")
    if not path:
        raise RuntimeError(
            "this SuperNode has no site config: start it with "
            "`fedtune client start` or `--node-config 'site-config=\"/path/site.toml\"'`"
        )
    return load_site(str(path))


class RoundConfig:
    """The server's per-message configuration, parsed once."""

    def __init__(self, config: ConfigRecord) -> None:
        self.spec = FederationSpec.model_validate_json(str(config["federation"]))
        self.run = str(config["run"])
        self.round = int(config["round"])
        self.rounds = int(config["rounds"])
        if self.rounds != self.spec.training.rounds:  # the score meter's bound is the run's own length, no other
            raise MeterRefused(
                f"the message announces {self.rounds} rounds, but its federation has training.rounds = "
                f"{self.spec.training.rounds}: refusing"
            )


def _site(message: Message, context: Context, resolve: SiteResolver) -> tuple[Site, RoundConfig]:
    """The full site (base model loaded, data tokenised), for the handlers that train or evaluate."""
    if threads := int(context.node_config.get("torch-threads", 0)):
        torch.set_num_threads(threads)  # simulation runs several sites per machine
    cfg = RoundConfig(message.content["config"])
    _require_fingerprint(cfg.spec)
    return get_site(resolve(context), cfg.spec), cfg


def _require_fingerprint(spec: FederationSpec) -> None:
    """Refuse a federation that names no base model fingerprint, before any folder is read: without one, whether
    a folder the server names loads (or, in `hello`, holds weights at all) would be the answer it gets."""
    if not spec.base_model.fingerprint:
        raise BaseModelError("the federation names no base model fingerprint")


def _site_spec(message: Message, context: Context, resolve: SiteResolver) -> tuple[SiteSpec, RoundConfig]:
    """Only the site's configuration: the secure-aggregation stages need keys, not the model.

    In deployment every message runs in a fresh process, so not loading the model
    for the three key/share stages saves a model load each.
    """
    return resolve(context), RoundConfig(message.content["config"])


def _scores(site: Site, result: EvalResult | None, secure: bool, cfg: RoundConfig) -> tuple[np.ndarray, RecordDict]:
    """The scores' secure-sum coordinates (zeros unless the site's file sets `secure_scores`) and the plaintext
    record (only where its file sets `share_eval_metrics`): held-out figures leave a site only by its own choice."""
    sa = cfg.spec.secagg
    own = site.site
    vector = np.zeros(scores.LENGTH)
    if result is None:
        return vector, RecordDict()
    if secure and own.secure_scores:
        vector = scores.encode(result.num_examples, result.loss, result.accuracy, sa.clip_range, sa.weight_cap)
    if not own.share_eval_metrics:
        return vector, RecordDict()
    return vector, RecordDict(
        {"scores": MetricRecord({**result.as_metrics(), "epsilon": reported_epsilon(site.epsilon_spent())})}
    )


def _brings_scores(site: SiteSpec, result: EvalResult | None) -> bool:
    """The signed role: from the site's settings and its meter (whether it scored), never from the figures' values,
    which a server's adapter can bend (a role read off them would tell whether some held-out row met its condition)."""
    return site.secure_scores and result is not None and result.num_examples > 0


def _releases_scores(site: SiteSpec, secure: bool) -> bool:
    return site.share_eval_metrics or (secure and site.secure_scores)


class SiteFailed(RuntimeError):
    """All the server reads of an error whose text the site keeps to itself."""


SITE_FAILED = (
    "the site stopped on an error whose text could carry its data (a file's line, a label, a value); "
    "its operator reads the reason in the site's log"
)
# Refusals whose words come from the message and the site's own settings, never from its rows: the server's operator
# reads them as they are. Anything else (a data file's error names a line and a label; a failure after the rows were
# read would answer whatever question the message asked of them) leaves as SITE_FAILED.
PUBLIC_ERRORS = (SecAggError, MeterRefused, DuplicateRound, AdapterRefused, ValidationError)
# A server naming any directory as the base model learnt from the refusal's text whether it exists, holds weights,
# and 16 hex digits of their hash: the site says only that the model it was asked for is not the one it has.
BASE_MODEL_REFUSED = (
    "this site's base model fingerprint does not match the federation's: its operator must install the exact "
    "checkpoint the federation names (the detail is in the site's log)"
)


def _guarded(
    handler: Callable[[Message, Context], Message], resolve: SiteResolver, in_process: bool
) -> Callable[[Message, Context], Message]:
    """`handler`, with every error reply logged in the egress log like any reply, its text public or SITE_FAILED."""

    @functools.wraps(handler)
    def run(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as exc:
            public = isinstance(exc, PUBLIC_ERRORS)
            if not public:
                log.error("%s failed at this site: %s", message.metadata.message_type, exc, exc_info=True)
            leaving = exc if public else SiteFailed(SITE_FAILED)
            _log_error_reply(message, context, resolve, leaving, in_process)
            if public:
                raise
            raise leaving from None

    return run


def _log_error_reply(
    message: Message, context: Context, resolve: SiteResolver, exc: Exception, in_process: bool
) -> None:
    """The error reply in the egress log, as the text Flower sends (its `type:<'message'>` form, in the worker
    and in simulation alike), under the message's run and round, or run "" and round 0 where its config is
    unreadable (a config the site could not parse is what the error is about)."""
    reason = str(type(exc)) + ":<'" + str(exc) + "'>"
    try:
        site = resolve(context)
    except Exception:  # no site file: nothing of a site's to log, or to leak
        log.warning("an error reply to %s is not in any egress log", message.metadata.message_type)
        return
    try:
        cfg = RoundConfig(message.content["config"])
        run, round_ = cfg.run, cfg.round
    except Exception:
        run, round_ = "", 0
    egress_log(site).record_error(reason, run=run, round_=round_, delivered=in_process)


def make_client_app(resolve: SiteResolver = site_from_node_config, *, in_process: bool = False) -> ClientApp:
    """The ClientApp; `in_process` where Flower hands replies over inside this process (simulation)."""
    app = ClientApp()

    def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        return _guarded(handler, resolve, in_process)

    def reply(
        message: Message,
        site: SiteSpec,
        cfg: RoundConfig,
        content: RecordDict,
        kinds: dict[str, str],
        *,
        spend: bool = False,
        run: str | None = None,
    ) -> Message:
        """The reply, logged before it leaves: as delivered where it is handed over in this process (simulation),
        else as pending until the site's worker has pushed it to the SuperNode (`client/worker.py`). `spend` marks
        the reply that follows a committed spend: the ledger must hold every spend the log shows, under `run` where
        the ledger keys it otherwise (a distributed-noise session's spends)."""
        content["info"] = ConfigRecord({"site": site.name})
        kinds = {**kinds, "info": "metrics"}
        egress_log(site).record(
            run=run or cfg.run, round_=cfg.round, kinds=kinds, content=content, delivered=in_process, spend=spend
        )
        return Message(content, reply_to=message)

    @app.train()
    @guarded
    def train(message: Message, context: Context) -> Message:
        site, cfg = _site(message, context, resolve)
        global_state = from_record(message.content["global"])
        secure = "secagg" in message.content
        meter = ScoreMeter.admit(context, cfg.run, cfg.round, cfg.rounds)
        if secure:  # a round this site would refuse on its face costs it no budget
            secure_site.preflight(message, site.site)
        # Score the adapter the message brings (the previous round's) before training on it, so that no second
        # download is needed; the scores leave only if the site then trains (and so pays) this round.
        wanted = _releases_scores(site.site, secure) and meter.may_score_before_training(cfg.round)
        result = site.evaluate(global_state, prior=False) if wanted else None
        try:
            outcome = site.train(global_state, cfg.run, cfg.round, cfg.rounds, plaintext=not secure)
        except Declined as exc:
            content = RecordDict(
                {
                    "decline": ConfigRecord({"reason": exc.public}),
                    "metrics": MetricRecord({"declined": 1, "epsilon": reported_epsilon(site.epsilon_spent())}),
                }
            )
            kinds = {"decline": "decline", "metrics": "metrics"}
            if secure:  # still one of the n, with zeros and role 0: it keeps the threshold but is counted by no site
                trained = trained_keys(global_state, cfg.spec, phase_of(cfg.spec, cfg.round))
                zeros = np.zeros(num_parameters(select(global_state, trained)) + 1 + scores.LENGTH)
                advert = secure_site.start(message, context, site.site, zeros, role=0)
                content["keys"] = ConfigRecord(advert.to_dict())
                kinds["keys"] = "public-keys"
            return reply(message, site.site, cfg, content, kinds)
        if result is not None and not site.release_scores(cfg.run, cfg.round - 1):
            result = None
        meter.record(context, trained=cfg.round, scored=cfg.round - 1 if result is not None else None)
        scored, own = _scores(site, result, secure, cfg)
        kinds = {"scores": "metrics"} if "scores" in own else {}
        # Privacy accounting only, rounded: sigma and exact epsilons are functions of the row count.
        metrics = MetricRecord(
            {"epsilon": reported_epsilon(outcome.spend.epsilon_after), "epsilon-cap": site.epsilon_cap}
        )
        if secure:
            sa = cfg.spec.secagg
            weight = site_weight(sa.weighting, outcome.num_examples, sa.weight_cap)
            vector = np.concatenate([pack(flatten(outcome.delta), weight, sa.clip_range), scored])
            role = ROLE_UPDATE | (ROLE_SCORES if _brings_scores(site.site, result) else 0)
            advert = secure_site.start(message, context, site.site, vector, role=role, scores_length=scores.LENGTH)
            content = RecordDict({**own, "keys": ConfigRecord(advert.to_dict()), "metrics": metrics})
            return reply(
                message, site.site, cfg, content, kinds | {"keys": "public-keys", "metrics": "metrics"}, spend=True
            )
        metrics["num-examples"] = outcome.num_examples  # plaintext rounds: allowed by the site's own file
        content = RecordDict({**own, "delta": to_record(outcome.delta), "metrics": metrics})
        return reply(
            message, site.site, cfg, content, kinds | {"delta": "adapter-delta", "metrics": "metrics"}, spend=True
        )

    @app.train("dp_advert")
    @guarded
    def dp_advert(message: Message, context: Context) -> Message:
        """Open a distributed-noise session (privacy.noise = 'distributed'): a signed key advert."""
        site, cfg = _site_spec(message, context, resolve)
        advert = distributed.advertise(message, context, site)
        return reply(message, site, cfg, RecordDict({"keys": ConfigRecord(advert.to_dict())}), {"keys": "public-keys"})

    @app.train("dp_step")
    @guarded
    def dp_step(message: Message, context: Context) -> Message:
        """One DP step of a distributed-noise session: the masked, noised gradient sum of this site's sample."""
        site, cfg = _site(message, context, resolve)
        meter = ScoreMeter.admit(context, cfg.run, cfg.round, cfg.rounds)
        out = distributed.step(message, context, site, may_score=meter.may_score_before_training(cfg.round))
        # a declined step sent only noise: the round does not count as trained, so it earns no final score
        trained = cfg.round if out.declined is None else None
        meter.record(context, trained=trained, scored=cfg.round - 1 if out.result else None)
        _, own = _scores(site, out.result, False, cfg)  # the plaintext figures, where the site's file shares them
        content = RecordDict({**own, "masked": ArrayRecord({"y": Array(out.masked)})})
        kinds = {"masked": "masked-vector"} | ({"scores": "metrics"} if "scores" in own else {})
        if out.epsilon is not None:  # the step that charged its round: both epsilons, rounded
            content["metrics"] = MetricRecord(
                {
                    "epsilon": reported_epsilon(out.epsilon),
                    "epsilon-worst": reported_epsilon(out.worst_epsilon),
                    "epsilon-cap": site.epsilon_cap,
                }
            )
            kinds["metrics"] = "metrics"
        if out.declined is not None:  # sent with its noise share, so the operator sees why its data is missing
            content["decline"], kinds["decline"] = ConfigRecord({"reason": out.declined}), "decline"
        return reply(message, site.site, cfg, content, kinds, spend=out.epsilon is not None, run=out.ledger_run)

    @app.train("secagg_share")
    @guarded
    def secagg_share(message: Message, context: Context) -> Message:
        site, cfg = _site_spec(message, context, resolve)
        shares = secure_site.share(message, context, site)
        content = RecordDict({"shares": ConfigRecord(shares.to_dict())})
        return reply(message, site, cfg, content, {"shares": "encrypted-shares"})

    @app.train("secagg_mask")
    @guarded
    def secagg_mask(message: Message, context: Context) -> Message:
        site, cfg = _site_spec(message, context, resolve)
        masked = secure_site.mask(message, context, site)
        content = RecordDict(
            {
                "header": ConfigRecord(masked.to_dict()),
                "masked": ArrayRecord({"y": Array(np.ascontiguousarray(masked.vector, dtype=np.uint32))}),
            }
        )
        return reply(message, site, cfg, content, {"header": "masked-vector", "masked": "masked-vector"})

    @app.train("secagg_consistency")
    @guarded
    def secagg_consistency(message: Message, context: Context) -> Message:
        site, cfg = _site_spec(message, context, resolve)
        signature = secure_site.consistency(message, context, site)
        content = RecordDict({"signature": ConfigRecord(signature.to_dict())})
        return reply(message, site, cfg, content, {"signature": "consistency-signature"})

    @app.train("secagg_unmask")
    @guarded
    def secagg_unmask(message: Message, context: Context) -> Message:
        site, cfg = _site_spec(message, context, resolve)
        shares = secure_site.unmask(message, context, site)
        content = RecordDict({"unmask": ConfigRecord(shares.to_dict())})
        return reply(message, site, cfg, content, {"unmask": "unmask-shares"})

    @app.evaluate()
    @guarded
    def evaluate(message: Message, context: Context) -> Message:
        """The run's last adapter, which no training message carries: scored once, and only by a site that trained
        in the run's last round (see `client/scoring.py`)."""
        site, cfg = _site(message, context, resolve)
        meter = ScoreMeter.admit(context, cfg.run, cfg.round, cfg.rounds)
        secure = "secagg" in message.content
        if not secure and not site.site.allow_plaintext:
            raise MeterRefused(
                "evaluation without secure aggregation, and this site's file sets allow_plaintext = false"
            )
        if secure:  # a request refused on its face must not use up a release or the run's final score
            secure_site.preflight(message, site.site)
        if not meter.may_score_final(cfg.round):
            raise MeterRefused(
                f"round {cfg.round} of run {cfg.run}: a site scores the final adapter once, after training in the "
                f"run's last round ({meter.rounds}); it last trained in round {meter.trained}"
            )
        wanted = _releases_scores(site.site, secure) and site.release_scores(cfg.run, cfg.round)
        result = site.evaluate(from_record(message.content["global"]), prior=False) if wanted else None
        meter.record(context, scored=cfg.round)
        scored, content = _scores(site, result, secure, cfg)
        kinds = {"scores": "metrics"} if "scores" in content else {}
        if secure:
            role = ROLE_SCORES if _brings_scores(site.site, result) else 0
            advert = secure_site.start(message, context, site.site, scored, role=role, scores_length=scores.LENGTH)
            content["keys"], kinds["keys"] = ConfigRecord(advert.to_dict()), "public-keys"
        return reply(message, site.site, cfg, content, kinds)

    @app.query()
    @guarded
    def hello(message: Message, context: Context) -> Message:
        """Say which site this node is and whether it can train: the server names a site that cannot, with why.

        Cheap on purpose (it runs before every round for new or not-ready nodes): the base model's fingerprint
        and the ledger's health, the two refusals a site cannot fix mid-run.
        """
        spec, cfg = _site_spec(message, context, resolve)
        try:
            _require_fingerprint(cfg.spec)
            try:
                verify_fingerprint(local_spec(cfg.spec, spec))
            except OSError as exc:  # a server-named path's missing file, link or permission: the same refusal
                raise BaseModelError(str(exc)) from None
            PrivacyLedger(Path(spec.state_dir) / "ledger.sqlite").close()  # raises if it fails closed
        except LedgerError as exc:  # its detail (spend counts, epsilons) stays at the site, in its log
            log.error("site %s cannot train: %s", spec.name, exc)
            refusal = RecordDict({"decline": ConfigRecord({"reason": LEDGER_REFUSED})})
            return reply(message, spec, cfg, refusal, {"decline": "decline"})
        except BaseModelError as exc:  # its detail (a directory, its files' hash) is the site's, not the server's
            log.error("site %s cannot train: %s", spec.name, exc)
            refusal = RecordDict({"decline": ConfigRecord({"reason": BASE_MODEL_REFUSED})})
            return reply(message, spec, cfg, refusal, {"decline": "decline"})
        except Exception as exc:  # whatever stops this site from training is what the operator must read
            refusal = RecordDict({"decline": ConfigRecord({"reason": short_reason(exc)})})
            return reply(message, spec, cfg, refusal, {"decline": "decline"})
        return reply(message, spec, cfg, RecordDict(), {})

    return app


app = make_client_app()
