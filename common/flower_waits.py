"""Flower 1.42's fixed waits, shortened where fedtune's rounds wait on them.

A secure round is five exchanges of small messages, and at the sites each stage is milliseconds of work. Flower's
deployment path sleeps between polls at fixed intervals tuned for long local training:

- the SuperNode sleeps 3 s whenever a poll of the SuperLink finds no message, and checks for the ClientApp's
  reply every 0.5 s (`flwr/supernode/start_client_internal.py`); after each reply the next stage's message is
  usually not there yet, so almost every exchange paid the 3 s sleep;
- an object that is not stored yet (the message arrives before its arrays) is retried after 1 s, 2 s, 4 s
  (`PULL_INITIAL_BACKOFF`), at the SuperNode pulling a message and at the ServerApp pulling a reply.

Measured before this module (benchmarks/deploy.py): a deployed round took 30 s against 5 s in simulation, of which
the sites' work was about 6 s. None of these waits is a setting in Flower 1.42, so this module replaces them in
Flower's own modules, in the processes fedtune starts (the site's SuperNode, the ServerApp). Nothing else in
Flower changes: same messages, same transport, same authentication. `shorten` refuses to run against a Flower
whose modules no longer have these names, so an upgrade that moves them fails loudly instead of going slow.
"""

from __future__ import annotations

import functools
import importlib
import time
from types import ModuleType
from typing import Any

POLL_S = 0.1  # the longest any patched wait sleeps: a SuperNode idle poll is one small request to the SuperLink
FIRST_BACKOFF_S = 0.02  # first retry of an object not stored yet (Flower: 1 s, doubling)
# An object not stored yet is usually on its way (the sender pushes a message, then its objects): doubling up to 1 s
# overshot its arrival by up to half the wait, at each of the two hops (SuperLink -> SuperNode -> worker)
BACKOFF_CAP_S = 0.1


class ShortSleeps:
    """The `time` module as a patched Flower module sees it: every `sleep` capped at `cap` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten(module: ModuleType, *, sleeps: bool) -> None:
    """Give `module` (a Flower module that imported `pull_objects`, and `time` if `sleeps`) the short waits."""
    from flwr.supercore.inflatable import inflatable_utils

    names = ["pull_objects", *(["time"] if sleeps else [])]
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"{module.__name__} has no {', '.join(missing)}: this Flower is not the 1.42 fedtune pins "
            "(pip install 'flwr[simulation]==1.42.0')"
        )
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        inflatable_utils.pull_objects, initial_backoff=FIRST_BACKOFF_S, backoff_cap=BACKOFF_CAP_S
    )
    if sleeps:
        module.time = ShortSleeps(POLL_S)  # type: ignore[attr-defined]


def shorten_serverapp_waits() -> None:
    """The ServerApp's reply pulls: a reply is listed before its arrays are stored, then retried after 1 s, 2 s."""
    shorten(importlib.import_module("flwr.superlink.grid.http_grid"), sleeps=False)


def shorten_supernode_waits() -> None:
    """The SuperNode's idle poll, reply check and message-object pulls."""
    shorten(importlib.import_module("flwr.supernode.start_client_internal"), sleeps=True)
