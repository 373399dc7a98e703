"""Configuration for the two roles: the federation (operator) and the site.

Both are TOML files validated with pydantic. Validation happens before anything
expensive runs, and every error names the file and the offending key, so an
operator or a site administrator can fix the file without reading code.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The noise multipliers a site composes: the privacy accountant's search range, and the bounds of a federation-fixed
# sigma (a sigma past the top buys nothing a site needs, and makes a round free: with it a server could ask for
# rounds, and their held-out scores, at no privacy cost; an infinite one hangs the accountant).
MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 64.0


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    # Unknown keys are refused: a typo such as `epsilon_cpa` must not silently
    # fall back to a default privacy setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelSpec(_Strict):
    """Where every site finds the base model, and which weights it must be."""

    path: Path = Field(description="Local directory with config.json and *.safetensors weights.")
    fingerprint: str | None = Field(
        default=None,
        description="SHA-256 over the safetensors weights (`fedtune fingerprint DIR`). "
        "Sites refuse to train when their local copy differs.",
    )
    max_length: int = Field(default=64, ge=8, le=4096, description="Tokens per example.")


class TaskSpec(_Strict):
    kind: Literal["classification", "causal-lm"] = "classification"
    labels: list[str] = Field(default_factory=list, description="Class names, classification only.")
    responses: list[str] = Field(
        default_factory=list,
        max_length=10_000,
        description="Causal LM: the answers a response may be (public, like a classifier's labels), e.g. intent "
        "names. Generation and held-out exact match then choose among them (greedy decoding constrained to "
        "continue some answer); training is unchanged. Empty: free text.",
    )
    pooling: Literal["mean", "cls", "last"] = Field(
        default="mean",
        description="How a classifier turns token states into one vector: 'mean' over real tokens (what "
        "sentence encoders such as all-MiniLM were trained for), 'cls' (the first token, BERT-style) or "
        "'last' (the last real token, for decoder models). Classification only.",
    )
    head_init: Literal["label-names", "random"] = Field(
        default="label-names",
        description="Start the classifier head from the base model's own features of each label's name "
        "('card_arrival' -> 'card arrival'): a zero-shot classifier built only from the public label list, "
        "so it costs no privacy budget. 'random': Hugging Face's random init.",
    )
    head_init_scale: float = Field(default=2.0, gt=0.0, description="Norm of each label-name head row.")
    system_prompt: str | None = Field(
        default="",
        description="Causal LM with a chat template: the system message every prompt is rendered with ('' an "
        "empty one, which keeps prompts short; None: the template's own default). Models without a chat template "
        "read the prompt followed by a newline.",
    )
    label_prior: Literal["site", "none"] = Field(
        default="site",
        description="'site': each site scores (and, with `fedtune predict --prior-from`, predicts) with the log "
        "of its own training-label frequencies added to the shared model's logits, so a site that sees some "
        "labels far more often than the federation does is not scored on the federation's label mix; the "
        "frequencies never leave the site. 'none': the shared model's logits as they are. Classification only.",
    )

    @model_validator(mode="after")
    def _labels_match_kind(self) -> Self:
        if self.kind == "classification":
            if len(self.labels) < 2:
                raise ValueError("task.labels needs at least two class names for classification")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("task.labels contains duplicates")
        elif self.labels:
            raise ValueError("task.labels is only meaningful for kind = 'classification'")
        if self.responses and self.kind != "causal-lm":
            raise ValueError("task.responses is only meaningful for kind = 'causal-lm'")
        if len(set(self.responses)) != len(self.responses) or not all(r.strip() for r in self.responses):
            raise ValueError("task.responses has duplicates or empty answers")
        return self


class LoraSpec(_Strict):
    r: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1, le=4096)  # bounded: a site runs whatever scale the server names
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        description="Names of the Linear modules that get LoRA adapters (a name matches the end of a module's "
        "path); only modules inside the model's transformer layers are allowed.",
    )
    layers: int | None = Field(
        default=None,
        ge=1,
        description="LoRA on the top N transformer layers only (None: every layer). For causal LM the frozen "
        "layers below run once per site, which computes and keeps their output (never sent), so a DP step costs N "
        "layers instead of all: what makes DP-LoRA affordable on a CPU site.",
    )
    factors: Literal["b", "ab"] = Field(
        default="b",
        description="'b' (FFA-LoRA, Sun et al. 2024): A stays at its shared random init and only B trains and "
        "travels, so averaging B is exact FedAvg of B·A and the upload halves; 'ab': both train.",
    )


class DistributedHeadSpec(_Strict):
    """The head phase under `privacy.noise = "distributed"`: centralised DP-SGD on the union of the sites' rows.

    Each step every site Poisson-samples its rows at `sample_rate`, and one secure sum carries the clipped
    gradients and the whole step's noise; the server divides by the expected batch (rate times the summed rows)
    and takes an SGD step with momentum. Chosen on the validation split of banking77's train.csv
    (benchmarks/README.md).
    """

    steps: int = Field(default=200, ge=1, description="DP steps over the whole head phase, spread over its rounds.")
    sample_rate: float = Field(default=0.2, gt=0.0, le=1.0, description="Poisson rate of every site's rows.")
    learning_rate: float = Field(default=1.0, gt=0.0, le=100.0, description="The server's SGD step.")
    reference_noise: float | None = Field(
        default=0.002,
        gt=0.0,
        description="Above this noise on the mean gradient (sigma / (sample_rate * the sites' rows), in units of the "
        "clip norm) the server's step shrinks in proportion; None: a fixed step.",
    )
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)


class HeadPhaseSpec(_Strict):
    """Linear probing before fine-tuning (Kumar et al. 2022): the first rounds train only the classifier head.

    The head reads pooled features of the frozen encoder, which a site computes once, so a DP-SGD step costs
    microseconds and large batches and many steps are affordable. Every step is charged to the ledger like any
    other DP-SGD step.
    """

    rounds: int = Field(
        default=20,
        ge=0,
        description="Head-only rounds at the start of a classification run (all rounds if the run is shorter; "
        "0: none). Causal LM has no head and ignores this.",
    )
    local_steps: int = Field(default=40, ge=1, description="DP-SGD steps on the head per site per round.")
    batch_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Expected batch as a fraction of the site's rows."
    )
    learning_rate: float = Field(default=0.25, gt=0.0, le=100.0, description="SGD with momentum 0.9.")
    reference_sigma: float | None = Field(
        default=8.0,
        gt=0.0,
        description="Above this noise multiplier the step shrinks in proportion (lr * reference_sigma / sigma), "
        "so that the noise one step adds to the head stays the same at any epsilon; None: a fixed step.",
    )
    distributed: DistributedHeadSpec = DistributedHeadSpec()


class TrainingSpec(_Strict):
    rounds: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="All rounds, head rounds first; rounds beyond training.head.rounds fine-tune LoRA (and the head).",
    )
    sites_per_round: int = Field(default=0, ge=0, description="0 means every connected site.")
    min_sites: int = Field(default=2, ge=1, description="A round needs at least this many updates.")
    local_steps: int = Field(default=20, ge=1, description="DP-SGD steps per site per round.")
    local_epochs: float | None = Field(
        default=None, gt=0.0, description="If set, steps per round = epochs * site rows / batch_size instead."
    )
    batch_size: int = Field(default=64, ge=1, description="Expected (Poisson) batch size.")
    optimizer: Literal["sgd", "adamw"] = Field(
        default="sgd", description="SGD with momentum copes with DP noise far better than Adam at small batches."
    )
    learning_rate: float = Field(default=0.1, gt=0.0, le=10.0)
    server_learning_rate: float = Field(default=1.0, gt=0.0, description="Scale of the FedAvg step.")
    seed: int = 0
    round_timeout_s: float = Field(default=600.0, gt=0.0)
    head: HeadPhaseSpec = HeadPhaseSpec()


class PrivacySpec(_Strict):
    """Record-level DP at each site.

    Either a fixed `noise_multiplier` per round, or (the default) sigma chosen by
    each site from its remaining budget so that its cap lasts for every round.
    """

    target_delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    # bounded: a site clips at whatever norm the server names, and its integer scaling (CLIP_UNITS / clip) and the
    # noise one step adds to a head must stay finite in float32
    max_grad_norm: float = Field(default=1.0, ge=1e-6, le=1e3)
    noise_multiplier: float | None = Field(
        default=None, ge=MIN_NOISE_MULTIPLIER, le=MAX_NOISE_MULTIPLIER, allow_inf_nan=False
    )
    default_epsilon_cap: float = Field(default=8.0, gt=0.0, description="Used by sites without a cap.")
    accountant: Literal["prv", "rdp"] = Field(
        default="prv",
        description="Opacus accountant that composes a dataset's whole history: 'prv' (privacy random "
        "variables, tight) or 'rdp' (Renyi DP, looser: more noise for the same epsilon).",
    )
    noise: Literal["local", "distributed"] = Field(
        default="local",
        description="'local': each site's update carries the noise its own epsilon needs. 'distributed': each "
        "DP step of the head phase is one secure sum to which every site adds a share of the noise, so the sum "
        "carries the noise of one centralised DP-SGD step (sites must opt in with `min_honest_sites`).",
    )
    epsilon: float | None = Field(
        default=None,
        gt=0.0,
        description="Distributed noise: the epsilon the run spends at each site under its honest-site assumption "
        "(sigma is chosen for it); default: default_epsilon_cap.",
    )


class SecAggSpec(_Strict):
    enabled: bool = True
    clip_range: float = Field(default=0.5, gt=0.0, description="|weighted delta| clipped to this.")
    threshold_fraction: float = Field(
        default=2 / 3,
        gt=0.0,
        lt=1.0,
        description="Shamir threshold t = the least integer above this fraction of a round's sites. Sites refuse "
        "a t at or below their own floor (site file `threshold_floor`, default 2/3).",
    )
    weighting: Literal["examples", "uniform"] = Field(
        default="examples",
        description="How each site weighs its own update inside the masked sum: by its rows (capped at "
        "weight_cap) or equally. The server never chooses a site's weight and learns only the total.",
    )
    weight_cap: int = Field(default=100_000, ge=1, description="Rows beyond this count weigh no more.")
    stage_timeout_s: float = Field(default=120.0, gt=0.0)


class FederationSpec(_Strict):
    name: str = Field(default="fedtune", min_length=1)
    base_model: BaseModelSpec
    task: TaskSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec()
    secagg: SecAggSpec = SecAggSpec()
    output_dir: Path = Field(default=Path(".fedtune/runs"), description="Checkpoints and run store.")

    @model_validator(mode="after")
    def _sites(self) -> Self:
        t = self.training
        if t.sites_per_round and t.sites_per_round < t.min_sites:
            raise ValueError("training.sites_per_round must be 0 (all) or >= training.min_sites")
        if self.privacy.noise == "distributed":
            if self.task.kind != "classification" or t.head.rounds < t.rounds:
                raise ValueError(
                    "privacy.noise = 'distributed' trains the classifier head (one secure sum per DP step): "
                    "set training.head.rounds >= training.rounds, or use privacy.noise = 'local' for LoRA rounds"
                )
            if not self.secagg.enabled:
                raise ValueError("privacy.noise = 'distributed' needs secagg.enabled = true: the noise is shared")
            if t.sites_per_round:
                raise ValueError("privacy.noise = 'distributed' uses every site each step: set sites_per_round = 0")
        return self


class DataSpec(_Strict):
    train: Path = Field(description="CSV, JSONL or Parquet file with the site's training rows.")
    eval: Path | None = Field(default=None, description="Held-out rows; else eval_fraction of train.")
    eval_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    dataset_name: str | None = Field(
        default=None,
        min_length=1,
        description="Names this data's privacy budget explicitly: every file the site declares under this name is "
        "charged to one budget, whatever its rows. Without it the budget is found from the rows themselves (a file "
        "that shares any row with an earlier one is charged with that file's history).",
    )


SITE_EPSILON_CAP = 8.0  # a site without its own cap never accepts a looser one from the federation


class SiteSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataSpec
    epsilon_cap: float | None = Field(
        default=None,
        gt=0.0,
        description=f"Total epsilon per dataset. Unset: {SITE_EPSILON_CAP:g}, or the federation's "
        "privacy.default_epsilon_cap where that is smaller (a server can make a site stricter, never looser).",
    )
    epsilon_per_run: float | None = Field(
        default=None,
        gt=0.0,
        description="Most epsilon one run may add; default: a run may use all that is left of the cap.",
    )
    epsilon_window_hours: float = Field(
        default=24.0,
        gt=0.0,
        description="epsilon_per_run limits the epsilon added by all spends within this many hours, whatever run "
        "ids the server uses (the site's clock measures it: a server could otherwise start a new run each round).",
    )
    privacy_delta: float = Field(
        default=1e-5,
        gt=0.0,
        lt=1.0,
        description="The delta of this site's (epsilon, delta) guarantee: the ledger accounts at this delta (or at "
        "the federation's privacy.target_delta when that is smaller), and a federation asking for a larger delta "
        "is declined. Typically below 1 / the number of rows.",
    )
    base_model_path: Path | None = Field(
        default=None,
        description="This site's copy of the base model; defaults to the federation's base_model.path. "
        "Its fingerprint must match the federation's.",
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    seed: int | None = Field(
        default=None,
        description="Seeds DP noise, Poisson sampling and the held-out split so that a simulation or benchmark "
        "repeats exactly. Leave unset in deployment: the noise then comes from OS entropy and the split from a "
        "seed the site draws once and keeps in STATE_DIR/split-seed.",
    )
    state_dir: Path = Field(
        default=Path(".fedtune/site"), description="Ledger (+ its high-water mark), audit log, keys, split seed."
    )
    identity_key: Path | None = Field(
        default=None, description="Ed25519 private key (PEM, mode 0600); default STATE_DIR/identity.pem."
    )
    peers: dict[str, str] = Field(
        default_factory=dict,
        description="Pinned Ed25519 public keys (hex) of every site in the federation, this one included, "
        "obtained out of band. Secure aggregation aborts on any key the server relays that is not pinned here.",
    )
    threshold_floor: float = Field(
        default=2 / 3,
        ge=0.0,
        lt=1.0,
        description="Secure aggregation: refuse any round whose Shamir threshold t is not above this fraction "
        "of its sites. Above 2/3, a server colluding with fewer than t sites cannot unmask this site.",
    )
    min_round_sites: int = Field(
        default=3,
        ge=2,
        description="Secure aggregation: refuse any secure sum with fewer sites than this (in its participant list, "
        "its accepted adverts or its survivors). In a sum of two sites, each learns the other's update by "
        "subtracting its own: a two-site federation must set 2 knowingly.",
    )
    min_honest_sites: int | None = Field(
        default=None,
        ge=1,
        description="Distributed noise: how many sites of a secure sum, this one included, this site assumes add "
        "their noise share honestly (h). It adds 1/h of the step's noise variance, refuses sums of fewer than h "
        "sites, is charged the epsilon that holds if h sites are honest, and its ledger also records the epsilon "
        "of its own share alone. Unset: the site declines distributed noise.",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="Take part in rounds without secure aggregation, where the server sees this site's DP-noised "
        "update and its row count. By default the site declines such a round, so a server cannot downgrade it.",
    )
    share_eval_metrics: bool = Field(
        default=False,
        description="Also send this site's own held-out loss and accuracy in plaintext (exact, without DP noise; "
        "scored without the site's label prior). Default: never.",
    )
    secure_scores: bool = Field(
        default=False,
        description="Add this site's exact held-out figures (correct answers, rows, loss; no label prior) to the "
        "round's secure sum. Not DP: a server that drops this site between two rounds' sums learns its figures "
        "for those rounds. Default: the site sends zeros there.",
    )
    max_score_releases: int = Field(
        default=100,
        ge=0,
        description="With share_eval_metrics or secure_scores: the most rounds whose held-out figures may leave "
        "this site for one dataset, over every run. Each is an exact query on the held-out rows with an adapter "
        "the server chose, and a round can cost almost no epsilon (a tiny sample rate), so the ledger counts them; "
        "past the cap the figures stay at the site.",
    )

    def cap_under(self, spec: FederationSpec | None) -> float:
        """The epsilon cap this site enforces: its own, else the stricter of SITE_EPSILON_CAP and the federation's
        default. Budgets are the site's: a server raising `default_epsilon_cap` cannot raise an uncapped site's."""
        if self.epsilon_cap is not None:
            return self.epsilon_cap
        return min(SITE_EPSILON_CAP, spec.privacy.default_epsilon_cap) if spec else SITE_EPSILON_CAP

    @property
    def identity_key_path(self) -> Path:
        return self.identity_key or Path(self.state_dir) / "identity.pem"


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  - {where}: {e['msg']}")
    return "\n".join(lines)


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def _resolve_relative(data: dict, base: Path, keys: list[tuple[str, ...]]) -> None:
    """Paths in a config file are relative to that file, not to the working directory."""
    for key_path in keys:
        node = data
        for key in key_path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(key_path[-1]), str):
            p = Path(node[key_path[-1]]).expanduser()
            node[key_path[-1]] = str(p if p.is_absolute() else (base / p))


def load_federation(path: Path | str) -> FederationSpec:
    path = Path(path)
    data = _read_toml(path)
    _resolve_relative(data, path.parent, [("base_model", "path"), ("output_dir",)])
    try:
        return FederationSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(path, err)) from None


def load_site(path: Path | str) -> SiteSpec:
    path = Path(path)
    data = _read_toml(path)
    relative = [("data", "train"), ("data", "eval"), ("state_dir",), ("base_model_path",), ("identity_key",)]
    _resolve_relative(data, path.parent, relative)
    try:
        return SiteSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(path, err)) from None
