"""Error types for secure aggregation.

Why a small hierarchy: the transport layer (Flower ServerApp/ClientApp) must tell apart a
misconfiguration (fix the config and restart), an integrity failure (possible attack or corruption:
abort the round and alert the operator) and a round abort (too many sites dropped: simply retry the
round later). Every message says what to do next.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggConfigError(SecAggError, ValueError):
    """The protocol parameters cannot give a correct or useful result; change the configuration."""


class SecAggIntegrityError(SecAggError):
    """A message failed an authenticity, freshness or consistency check; the round must be aborted."""


class SecAggAbort(SecAggError):
    """Too few sites remain to finish the round safely; the round yields no aggregate."""


MAX_REASON = 200  # characters of an error kept in logs and the run store: enough to act on, too few to flood them


def short_reason(reason: object) -> str:
    """One line, at most MAX_REASON characters: a malformed reply cannot write an essay into the run store."""
    text = " ".join(str(reason).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
