"""The deployment ServerApp: the same federation loop as simulation, driven by a real SuperLink.

The federation spec comes from the run config key `federation`, either a path
on the operator machine or the TOML text itself. `fedtune run` inlines the
text (with paths made absolute) so that the signed app bundle pins exactly
which model, task and privacy settings the sites were asked to train with.
"""

from __future__ import annotations

import logging
import tomllib
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from fedtune.common.config import ConfigError, FederationSpec, load_federation
from fedtune.common.flower_waits import shorten_serverapp_waits
from fedtune.server.federation import RoundReport, run_federation

FEDERATION_KEY = "federation"
RESUME_KEY = "resume"


def spec_from_run_config(value: object, base_dir: Path | None = None) -> FederationSpec:
    """Parse the `federation` run-config value: a path to a TOML file, or TOML text.

    Text is recognised by containing a newline or a `[table]` header; relative
    paths inside inline text resolve against `base_dir` (default: the cwd).
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"run config key {FEDERATION_KEY!r} is missing or empty: pass the federation TOML path, "
            "e.g. `fedtune run federation.toml` or `flwr run . -c 'federation=\"/abs/federation.toml\"'`"
        )
    if "\n" not in value and "[" not in value:
        return load_federation(Path(value).expanduser())
    try:
        data = tomllib.loads(value)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run config {FEDERATION_KEY!r}: inline federation is not valid TOML ({exc})") from None
    base = Path(base_dir or Path.cwd())
    model = data.get("base_model")
    if isinstance(model, dict) and isinstance(model.get("path"), str) and not Path(model["path"]).is_absolute():
        model["path"] = str(base / model["path"])
    if isinstance(data.get("output_dir"), str) and not Path(data["output_dir"]).is_absolute():
        data["output_dir"] = str(base / data["output_dir"])
    try:
        return FederationSpec.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"run config {FEDERATION_KEY!r}: invalid federation ({problems})") from None


class LogReporter:
    """Round progress as Flower log lines, which `flwr log` / `fedtune run` stream to the operator."""

    def round_started(self, round_: int, total: int) -> None:
        log(INFO, "[fedtune] round %d/%d started", round_, total)

    def round_finished(self, report: RoundReport) -> None:
        acc = report.weighted_accuracy
        update = report.update
        sites = len(update.sites) if update else len(report.evals)
        declined = sum(1 for s in update.sites.values() if s.declined) if update else 0
        up = sum(s.bytes_up for s in update.sites.values()) if update else 0
        down = sum(report.bytes_down.values())
        level = WARNING if report.error else INFO
        log(
            level,
            "[fedtune] round %d done in %.1fs: %d site(s), %d declined, accuracy %s, bytes up %d, down %d%s",
            report.round,
            report.wall_s,
            sites,
            declined,
            "n/a" if acc is None else f"{acc:.3f}",
            up,
            down,
            f", error: {report.error}" if report.error else "",
        )
        for site, reason in sorted(report.missing.items()):
            log(WARNING, "[fedtune] round %d: site %s did not contribute: %s", report.round, site, reason)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("fedtune").setLevel(logging.INFO)
    shorten_serverapp_waits()  # a reply's arrays are often stored just after it is listed: Flower retries after 1 s
    spec = spec_from_run_config(context.run_config.get(FEDERATION_KEY))
    log(
        INFO,
        "[fedtune] federation %s: %d round(s), secure aggregation %s, min %d site(s)",
        spec.name,
        spec.training.rounds,
        "on" if spec.secagg.enabled else "OFF",
        spec.training.min_sites,
    )
    # A restarted ServerApp gets a new Flower run id; `resume` continues the run store's run instead.
    run = str(context.run_config.get(RESUME_KEY) or context.run_id)
    result = run_federation(grid, spec, out_dir=spec.output_dir, reporter=LogReporter(), run=run)
    failed = [r.round for r in result.rounds if r.error]
    log(
        WARNING if failed else INFO,
        "[fedtune] run %s finished: %d round(s)%s; adapter at %s",
        result.run,
        len(result.rounds) - 1,
        f", rounds without update: {failed}" if failed else "",
        result.adapter_dir,
    )
