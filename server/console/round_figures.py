"""The numbers a tracking tool gets for each round, read from the run store.

TensorBoard and MLflow both log through this one reader, so the two show the same figures under the same names.
Only what the store holds is read, which is only what already left the sites (their held-out scores, their
epsilon, byte counts): exporting to a tracker sends nothing new out of a site.
"""

from __future__ import annotations

from collections.abc import Collection

from fedtune.server.store import RunStore

ROUND_KEYS = ("weighted_accuracy", "weighted_loss", "wall_s", "train_s", "eval_s")
SITE_KEYS = ("eval_accuracy", "eval_loss", "epsilon", "epsilon_worst", "bytes_up", "bytes_down")
# Logged for every round that has a row, even with nothing sent: a tracker can tell a logged round by it.
ROUND_MARKER = "global/bytes_down"

Scalars = list[tuple[str, float]]


def round_scalars(store: RunStore, run: str, rounds: Collection[int] | None = None) -> dict[int, Scalars]:
    """round -> (name, value) for each figure the store holds for it, names as `global/KEY` and `site/SITE/KEY`.

    `rounds` picks the rounds (None: all of them). The store is read once, whatever the number of rounds, so a
    long run's export does not read its tables once per round. Unknown values (NULL) are left out, not zeroed:
    a site that shared no score has no score, and a zero would draw as one.
    """
    out: dict[int, Scalars] = {}
    totals: dict[int, list[int]] = {}
    for r in store.rounds(run):
        if rounds is not None and r["round"] not in rounds:
            continue
        scalars = out.setdefault(r["round"], [])
        totals.setdefault(r["round"], [0, 0])
        scalars += [(f"global/{key}", float(r[key])) for key in ROUND_KEYS if r[key] is not None]
    for s in store.site_rounds(run):
        if rounds is not None and s["round"] not in rounds:
            continue
        scalars = out.setdefault(s["round"], [])
        total = totals.setdefault(s["round"], [0, 0])
        total[0], total[1] = total[0] + s["bytes_up"], total[1] + s["bytes_down"]
        scalars += [(f"site/{s['site']}/{key}", float(s[key])) for key in SITE_KEYS if s[key] is not None]
    for round_, (up, down) in totals.items():
        out[round_] += [("global/bytes_up", float(up)), (ROUND_MARKER, float(down))]
    return out
