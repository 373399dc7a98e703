"""When a site lets its held-out scores leave: metered by the site, never on the server's say-so.

Held-out figures are computed without DP noise, so every score a server obtains is a query on the held-out rows.
A server that could ask at will (adapters of its own making, round numbers of its own choosing, scores from a
site that declines to train) reads held-out labels one by one. A site therefore answers at most one score per
round it actually trains in (each of which the privacy ledger charges), for its run's own rounds in order,
never past the number of rounds the run announced in its first message, and the final adapter only after the
site trained in the run's last round. The meter lives in the node's Flower Context, which stays on the site.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

_KEY = "score-meter"


class MeterRefused(PermissionError):
    """The server asked for something the site's meter does not allow; the message says what."""


@dataclass
class ScoreMeter:
    run: str
    rounds: int
    trained: int = -1  # the last round this site trained in (committed a spend)
    scored: int = -1  # the last round whose adapter's scores left this site

    @classmethod
    def admit(cls, context: Context, run: str, round_: int, rounds: int) -> ScoreMeter:
        """The meter of this run, pinned at its first message; a later message naming another run or another
        number of rounds, or a round past that number, is refused."""
        if _KEY in context.state:
            rec = context.state[_KEY]
            meter = cls(str(rec["run"]), int(rec["rounds"]), int(rec["trained"]), int(rec["scored"]))
        else:
            meter = cls(run, rounds)
        if (run, rounds) != (meter.run, meter.rounds):
            raise MeterRefused(
                f"this message names run {run!r} with {rounds} rounds, but this Flower run began as {meter.run!r} "
                f"with {meter.rounds} rounds: refusing"
            )
        if not 1 <= round_ <= meter.rounds:
            raise MeterRefused(f"round {round_} is outside the run's announced rounds 1..{meter.rounds}: refusing")
        meter._save(context)
        return meter

    def may_score_before_training(self, round_: int) -> bool:
        """Whether a training message of `round_` may carry the scores of the adapter it brings (round_ - 1),
        should the site then train: rounds in order, each scored once."""
        return round_ > self.trained and round_ - 1 > self.scored

    def may_score_final(self, round_: int) -> bool:
        """The run's last adapter, which no training message carries: only after training in the last round."""
        return round_ == self.rounds and self.trained == round_ and self.scored < round_

    def record(self, context: Context, *, trained: int | None = None, scored: int | None = None) -> None:
        if trained is not None:
            self.trained = max(self.trained, trained)
        if scored is not None:
            self.scored = max(self.scored, scored)
        self._save(context)

    def _save(self, context: Context) -> None:
        context.state[_KEY] = ConfigRecord(
            {"run": self.run, "rounds": self.rounds, "trained": self.trained, "scored": self.scored}
        )
