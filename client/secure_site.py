"""The site's half of secure aggregation, across the four stage messages of a round.

Each stage may run in a fresh process, so the round's secrets (ephemeral keys,
self-mask seed, received shares) and the delta waiting to be masked live in the
node's Flower Context, which stays on the site. They are deleted after the
last stage. The identity key and pinned peer keys are always re-read from the
site's own configuration, never taken from the server.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedtune.common.config import SiteSpec
from fedtune.common.secagg.errors import SecAggIntegrityError
from fedtune.common.secagg.keys import load_identity_key
from fedtune.common.secagg.messages import (
    AdvertiseRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    ShareRequest,
    UnmaskRequest,
    UnmaskShares,
)
from fedtune.common.secagg.protocol import SecAggSite

_STATE, _INPUT = "secagg-state", "secagg-input"


def _identity(site: SiteSpec) -> Ed25519PrivateKey:
    return load_identity_key(site.identity_key_path)


def _pinned(site: SiteSpec) -> dict[str, str]:
    if not site.peers:
        raise SecAggIntegrityError(
            f"site {site.name} has no pinned peer keys (`peers` in its site config): it cannot verify "
            "the other sites' keys, so it will not take part in secure aggregation"
        )
    return dict(site.peers)


def preflight(site: SiteSpec) -> None:
    """Fail before training (and before spending budget) if this site cannot do secure aggregation."""
    _identity(site)
    _pinned(site)


def _load(context: Context, site: SiteSpec) -> SecAggSite:
    if _STATE not in context.state:
        raise SecAggIntegrityError("no secure-aggregation round in progress on this site; refusing the stage")
    blob = context.state[_STATE]["site"]
    return SecAggSite.from_state(bytes(blob), _identity(site), _pinned(site))


def _save(context: Context, secagg: SecAggSite) -> None:
    context.state[_STATE] = ConfigRecord({"site": secagg.to_state()})


def start(message: Message, context: Context, site: SiteSpec, delta: np.ndarray) -> KeyAdvert:
    """Stage 1, after training: keep the delta on the site and advertise signed ephemeral keys."""
    req = AdvertiseRequest.from_dict(dict(message.content["secagg"]))
    secagg = SecAggSite(
        message.metadata.dst_node_id,
        site.name,
        _identity(site),
        _pinned(site),
        expected_run_id=message.metadata.run_id,
        expected_round=int(message.content["config"]["round"]),
    )
    advert = secagg.advertise(req)
    context.state[_INPUT] = ArrayRecord({"x": Array(np.asarray(delta, dtype=np.float64))})
    _save(context, secagg)
    return advert


def share(message: Message, context: Context, site: SiteSpec) -> EncryptedShares:
    secagg = _load(context, site)
    shares = secagg.share(ShareRequest.from_dict(dict(message.content["secagg"])))
    _save(context, secagg)
    return shares


def mask(message: Message, context: Context, site: SiteSpec) -> MaskedInput:
    secagg = _load(context, site)
    weight = float(message.content["weight"]["weight"])
    if not 0.0 < weight <= 1.0:
        raise SecAggIntegrityError(f"aggregation weight {weight} is outside (0, 1]; refusing")
    delta = context.state[_INPUT]["x"].numpy()
    masked = secagg.masked_input(MaskedInputRequest.from_dict(dict(message.content["secagg"])), weight * delta)
    del context.state[_INPUT]
    _save(context, secagg)
    return masked


def unmask(message: Message, context: Context, site: SiteSpec) -> UnmaskShares:
    secagg = _load(context, site)
    try:
        return secagg.unmask(UnmaskRequest.from_dict(dict(message.content["secagg"])))
    finally:
        del context.state[_STATE]  # the round is over for this site, whatever happened
