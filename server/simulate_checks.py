"""What `fedtune simulate` refuses before it writes a file or starts Flower.

Each refusal is one line in the terms of the command line: the flag and its allowed range (read from the same
pydantic fields the federation file obeys, so the two cannot drift), a count of sites and why it is too small,
the federation file's base model directory. Found later, the same faults came as pydantic's text with a docs URL,
as the partitioner's `num_parts`/`min_size`, or as a traceback from inside Flower with a store left behind.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from pydantic import BaseModel, ValidationError

from fedtune.common.config import ConfigError, FederationSpec, PrivacySpec, SiteSpec, TaskSpec, TrainingSpec
from fedtune.common.model import BaseModelError, check_base_model_dir
from fedtune.common.partition import TooFewRows

# flag -> the spec field it sets, whose bounds it must obey
FLAG_FIELDS: dict[str, tuple[type[BaseModel], str]] = {
    "--rounds": (TrainingSpec, "rounds"),
    "--local-steps": (TrainingSpec, "local_steps"),
    "--batch-size": (TrainingSpec, "batch_size"),
    "--epsilon": (SiteSpec, "epsilon_cap"),
}
CHOICE_FIELDS: dict[str, tuple[type[BaseModel], str]] = {
    "--task": (TaskSpec, "kind"),
    "--noise": (PrivacySpec, "noise"),
}
_BOUNDS: tuple[tuple[str, str, Callable[[float, float], bool]], ...] = (
    ("gt", ">", operator.gt),
    ("ge", ">=", operator.ge),
    ("lt", "<", operator.lt),
    ("le", "<=", operator.le),
)


def bounds(model: type[BaseModel], field: str) -> list[tuple[str, float, Callable[[float, float], bool]]]:
    """The field's numeric limits as (symbol, bound, test), from its `Field(gt=..., le=...)` metadata."""
    return [
        (symbol, getattr(item, name), test)
        for item in model.model_fields[field].metadata
        for name, symbol, test in _BOUNDS
        if getattr(item, name, None) is not None
    ]


def check_flags(values: dict[str, float | None]) -> None:
    """Each given flag within the range of the field it sets, e.g. `--rounds 0: must be >= 1 and <= 10000`."""
    for flag, value in values.items():
        if value is None:
            continue
        limits = bounds(*FLAG_FIELDS[flag])
        if not all(test(value, bound) for _, bound, test in limits):
            allowed = " and ".join(f"{symbol} {bound:g}" for symbol, bound, _ in limits)
            raise ConfigError(f"{flag} {value:g}: must be {allowed}")


def check_choices(values: dict[str, str | None]) -> None:
    """Each given flag one of the values of the `Literal` field it sets: `--noise x: choose 'local' or ...`."""
    for flag, value in values.items():
        choices = get_args(CHOICE_FIELDS[flag][0].model_fields[CHOICE_FIELDS[flag][1]].annotation)
        if value is not None and value not in choices:
            raise ConfigError(f"{flag} {value}: choose {' or '.join(map(repr, choices))}")


def check_site_count(count: int, given_as: str, spec: FederationSpec | None, secagg: bool) -> None:
    """Enough virtual sites for a round: the federation's `training.min_sites`, and two for a secure sum.

    `given_as` names where the count came from (`--sites 1`, `--data given once`). With too few sites the run
    would only fail once Flower had started, waiting for updates that cannot come.
    """
    min_sites = (spec.training if spec else TrainingSpec()).min_sites
    needed = max(min_sites, 2 if secagg else 1)
    if count >= needed:
        return
    why = (
        f"training.min_sites = {min_sites}"
        if min_sites >= needed
        else "a secure sum needs at least two sites; --no-secagg runs without one"
    )
    raise ConfigError(f"{given_as}: a round needs at least {needed} sites ({why})")


def too_few_rows(exc: TooFewRows, split: Path) -> ConfigError:
    """The partitioner's refusal of `--sites N --split FILE`, in the command's terms."""
    fit = exc.rows // exc.min_size if exc.min_size else exc.rows
    return ConfigError(
        f"--sites {exc.parts}: {split} has {exc.rows} rows, too few for {exc.parts} sites of at least "
        f"{exc.min_size} rows each (at most {fit} sites fit)"
    )


def check_federation_base_model(federation: Path, spec: FederationSpec) -> None:
    """The federation file's base model directory is there, before any site key, store or process exists."""
    try:
        check_base_model_dir(spec.base_model.path)
    except BaseModelError as exc:
        raise ConfigError(
            f"{federation}: base_model.path: {exc}; put the model there (`fedtune base-model import SRC DIR`) or "
            "fix the path"
        ) from None


def overrides_error(exc: ValidationError) -> ConfigError:
    """The federation the flags produced breaks a rule of the file's own (a cross-field one: the ranges are
    checked above): each rule in one line, without pydantic's type names and docs URL."""
    rules = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'federation'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
    return ConfigError(f"the flags give an invalid federation: {rules}")
