"""`fedtune simulate`: the production ServerApp and ClientApp in Flower's simulation engine.

Nothing here is simulation-specific logic: virtual site k simply resolves its
SiteSpec from its partition id instead of from a SuperNode's node config.

Why `run_simulation`, which Flower deprecates for `flwr run`: `flwr run` starts a detached local SuperLink on a
loopback port, which runs the app in a `flwr-simulation` process that installs it from a bundle, loads the ServerApp
and ClientApp by name and sends back an emptied context. This module's apps are objects built here around the spec,
the reporter and the result they hand back in-process; Flower 1.42 runs such objects only through `run_simulation`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedtune.client.client_app import make_client_app
from fedtune.common.config import FederationSpec, SiteSpec
from fedtune.server.federation import FederationResult, Reporter, run_federation


class SimulationError(RuntimeError):
    """The simulated federation did not complete."""


class _SiteByPartition:
    """Picklable resolver (Ray ships it to its actors)."""

    def __init__(self, sites: Sequence[SiteSpec]) -> None:
        self.sites = list(sites)

    def __call__(self, context: Context) -> SiteSpec:
        return self.sites[int(context.node_config["partition-id"])]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def simulate(
    spec: FederationSpec,
    sites: Sequence[SiteSpec],
    *,
    out_dir: Path,
    reporter: Reporter | None = None,
    parallel_sites: int | None = None,
    run: str | None = None,
    store: Path | None = None,
) -> FederationResult:
    """Run the federation with one virtual SuperNode per site; returns when all rounds are done.

    `store` is the run store file (default `out_dir/store.sqlite`); with `run` naming a run
    already in it, the run resumes after its last completed round.
    """
    if len(sites) < spec.training.min_sites:
        raise SimulationError(f"{len(sites)} site(s) given, but training.min_sites is {spec.training.min_sites}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise SimulationError(f"site names must be unique, got {names}")
    # Virtual sites belong to the researcher who wrote the federation: an unset cap is the federation's default.
    default = {"epsilon_cap": spec.privacy.default_epsilon_cap}
    sites = [s if s.epsilon_cap is not None else s.model_copy(update=default) for s in sites]
    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = run_federation(grid, spec, out_dir=out_dir, reporter=reporter, run=run, store=store)
        except Exception as exc:  # surfaced to the caller below, not lost in the engine's logs
            outcome["error"] = exc
            raise

    cpus = os.cpu_count() or 1
    workers = max(1, min(parallel_sites or cpus, len(sites), cpus))
    gpus = _visible_gpus() if any(s.device != "cpu" for s in sites) else 0
    backend = {
        # Ray hides GPUs from actors that reserve none, so GPU sites share the visible ones.
        "client_resources": {"num_cpus": max(1, cpus // workers), "num_gpus": gpus / workers if gpus else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False, "log_to_driver": False},
    }
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    # Flower prints its records through its own handler; importing Opacus adds a root handler (logging.basicConfig in
    # opacus/utils/module_utils.py), so each Flower warning printed twice. Flower itself stops propagation for the
    # same duplicates when an event loop runs (flwr/simulation/run_simulation.py, set_logger_propagation).
    flwr_log.propagate = False
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(_SiteByPartition(sites), in_process=True),
        num_supernodes=len(sites),
        backend_config=backend,
    )
    if "error" in outcome:
        raise SimulationError(f"the federation failed: {outcome['error']}") from outcome["error"]  # type: ignore[arg-type]
    if "result" not in outcome:
        raise SimulationError("the simulation engine stopped before the federation finished; see the log above")
    return outcome["result"]  # type: ignore[return-value]
