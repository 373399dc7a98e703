"""`fedtune simulate`: the researcher's entry point.

With no arguments it runs the built-in demo (synthetic bank sites on the
packaged MiniLM); options swap in real files, a federation file, or site files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedtune.common.config import ConfigError, FederationSpec, SiteSpec, load_federation, load_site
from fedtune.common.data import DataFileError, read_rows
from fedtune.server.demo import demo_federation, site_specs, split_file, write_demo_data
from fedtune.server.report import RichReporter, final_table
from fedtune.server.simulation import SimulationError, simulate

console = Console()


def _labels_of(files: list[Path], label_column: str) -> list[str]:
    labels: set[str] = set()
    for f in files:
        labels.update(r[label_column] for r in read_rows(f, [label_column]))
    return sorted(labels)


def _build(
    federation: Path | None,
    site_files: list[Path],
    data: list[Path],
    split: Path | None,
    sites: int,
    rows_per_site: int,
    text_column: str,
    label_column: str,
    epsilon: float | None,
    out: Path,
    seed: int,
) -> tuple[FederationSpec | None, list[SiteSpec], list[str]]:
    if site_files:
        if federation is None:
            raise ConfigError("--site needs --federation: site files do not say what model or task to train")
        return load_federation(federation), [load_site(p) for p in site_files], []
    columns = {"text_column": text_column, "label_column": label_column}
    if split:
        labels, files = split_file(
            split, out / "data", sites, text_column=text_column, label_column=label_column, alpha=0.5, seed=seed
        )
    elif data:
        files, labels = list(data), _labels_of(list(data), label_column)
    else:
        labels, files = write_demo_data(out, sites, rows_per_site, seed)
        columns = {"text_column": "text", "label_column": "label"}
    spec = load_federation(federation) if federation else None
    return spec, site_specs(files, out, epsilon_cap=epsilon, **columns), labels


def simulate_command(
    federation: Annotated[Path | None, typer.Option(help="Federation TOML; default: the demo federation.")] = None,
    site: Annotated[list[Path] | None, typer.Option(help="Site TOML, once per virtual site.")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="One data file per virtual site.")] = None,
    split: Annotated[Path | None, typer.Option(help="One labelled file split non-IID across --sites sites.")] = None,
    sites: Annotated[int, typer.Option(help="Virtual sites for the demo or --split.")] = 3,
    rounds: Annotated[int | None, typer.Option(help="Override training.rounds.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Override training.local_steps.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Epsilon cap of every virtual site.")] = None,
    secagg: Annotated[bool, typer.Option(help="Secure aggregation (the server sees only the sum).")] = True,
    rows_per_site: Annotated[int, typer.Option(help="Demo rows per site.")] = 300,
    text_column: Annotated[str, typer.Option()] = "text",
    label_column: Annotated[str, typer.Option()] = "label",
    parallel: Annotated[int | None, typer.Option(help="Sites trained at once (default: CPU count).")] = None,
    out: Annotated[Path, typer.Option(help="Work directory: site data, ledgers, checkpoints, adapter.")] = Path(
        ".fedtune/simulation"
    ),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Run a federation of virtual sites in Flower's simulation engine (default: the built-in demo)."""
    started = time.monotonic()
    try:
        spec, site_specs_, labels = _build(
            federation,
            site or [],
            data or [],
            split,
            sites,
            rows_per_site,
            text_column,
            label_column,
            epsilon,
            out,
            seed,
        )
        if spec is None:
            spec = demo_federation(labels, rounds=3, local_steps=15)
        training = spec.training.model_copy(
            update={k: v for k, v in {"rounds": rounds, "local_steps": local_steps}.items() if v is not None}
        )
        spec = spec.model_copy(
            update={"training": training, "secagg": spec.secagg.model_copy(update={"enabled": secagg})}
        )
        FederationSpec.model_validate(spec.model_dump())  # overrides obey the same rules as the file
    except (ConfigError, DataFileError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(
        f"[bold]fedtune simulate[/bold]: {len(site_specs_)} site(s), {spec.training.rounds} round(s), "
        f"task {spec.task.kind} ({len(spec.task.labels)} labels), secure aggregation "
        f"{'on' if spec.secagg.enabled else 'OFF'}, base model {spec.base_model.path.name}"
    )
    try:
        with RichReporter(console) as reporter:
            result = simulate(spec, site_specs_, out_dir=out / "runs", reporter=reporter, parallel_sites=parallel)
    except SimulationError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(final_table(result))
    console.print(f"adapter (PEFT format): {result.adapter_dir}")
    console.print(f"wall time: {time.monotonic() - started:.1f}s")
