"""A round's global adapter as files people can use: PEFT adapter dir, zip, or merged HF model.

The checkpoint holds bare tensors; PEFT's own format also needs the adapter
config, which only a model built from the run's federation spec can write. So
export rebuilds that model (base weights from disk, never a hub) and saves. A
merged classifier also carries the code that reads the federation's pooling
(`fedtune.common.merged`), or plain transformers would give other labels.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from fedtune.common.adapter import AdapterState, load_adapter_state, load_state, save_peft_adapter
from fedtune.common.config import FederationSpec
from fedtune.common.inference import CARD_FILE, README_FILE, SiteSpend, write_card
from fedtune.common.merged import save_merged
from fedtune.common.model import fingerprint_model, load_lora_model
from fedtune.server.store import Checkpoint, RunStore, StoreError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", CARD_FILE, README_FILE)


@dataclass(frozen=True)
class Exported:
    run: str
    round: int
    path: Path
    merged: bool
    spec: FederationSpec | None = None  # merged exports: what `load_hint` needs to say how to load it


def run_spec(store: RunStore, run: str) -> FederationSpec:
    """The run's federation, with a check that this machine's base model is the one it trained on."""
    info = store.run(run)
    spec = FederationSpec.model_validate_json(info["federation"])
    actual = fingerprint_model(spec.base_model.path)
    if info["base_fingerprint"] and actual != info["base_fingerprint"]:
        raise StoreError(
            f"the base model at {spec.base_model.path} (fingerprint {actual[:16]}...) is not the one run "
            f"{info['id']} trained on ({info['base_fingerprint'][:16]}...); an adapter is only valid on its base"
        )
    return spec


def site_spends(store: RunStore, run: str, round_: int) -> list[SiteSpend]:
    """Each site's epsilon as it reported it after `round_` (its ledger's total for that dataset); under
    distributed noise also the epsilon of its own noise share alone, where it reported one."""
    latest: dict[str, float] = {}
    worst: dict[str, float] = {}
    for row in store.site_rounds(run):
        if row["round"] > round_:
            continue
        if row["epsilon"] is not None:
            latest[row["site"]] = max(latest.get(row["site"], 0.0), float(row["epsilon"]))
        if row["epsilon_worst"] is not None:
            worst[row["site"]] = max(worst.get(row["site"], 0.0), float(row["epsilon_worst"]))
    return [SiteSpend(site, eps, worst.get(site)) for site, eps in sorted(latest.items())]


def write_adapter(
    model: PeftModel, state: AdapterState, out_dir: Path, spec: FederationSpec, store: RunStore, run: str, round_: int
) -> Path:
    """PEFT files plus the model card (label map, pooling, what each site spent: under distributed noise, both the
    epsilon charged under its honest-site assumption and the one of its own noise share alone)."""
    save_peft_adapter(model, state, out_dir)
    write_card(out_dir, spec, run=run, rounds=round_, sites=site_spends(store, run, round_))
    return Path(out_dir)


def export_round(
    store: RunStore, run: str, out_dir: Path, *, round_: int | None = None, merge: bool = False
) -> Exported:
    """Write round `round_` (default: the newest checkpoint) as a PEFT adapter dir, or merged into the base."""
    run_id = store.run(run)["id"]
    point: Checkpoint = store.checkpoint(run_id, round_)  # verifies the SHA-256
    spec = run_spec(store, run_id)
    loaded = load_lora_model(spec, seed=spec.training.seed)
    state = load_state(point.path)
    out_dir = Path(out_dir)
    if not merge:
        write_adapter(loaded.model, state, out_dir, spec, store, run_id, point.round)
        return Exported(run_id, point.round, out_dir, merged=False)
    load_adapter_state(loaded.model, state)
    merged = loaded.model.merge_and_unload()  # LoRA folded into the weights, trained head kept
    save_merged(merged, loaded.tokenizer, spec, out_dir)
    sites = site_spends(store, run_id, point.round)
    write_card(out_dir, spec, run=run_id, rounds=point.round, sites=sites, merged=True)
    return Exported(run_id, point.round, out_dir, merged=True, spec=spec)


def adapter_zip(store: RunStore, run: str, round_: int) -> bytes:
    """The PEFT adapter of one round as a zip (what the console's download button serves)."""
    with tempfile.TemporaryDirectory(prefix="fedtune-export-") as tmp:
        exported = export_round(store, run, Path(tmp) / "adapter", round_=round_)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in ADAPTER_FILES:
                zf.write(exported.path / name, arcname=name)
        return buffer.getvalue()
