"""The run's recipe and privacy settings in words, from the federation spec the store kept when the run started.

An operator signing off a run (or an auditor after it) asks what was trained, on which base, how hard and under
which privacy terms: a JSON dump answers that only for someone who knows every field's default and meaning. So
the spec is laid out in sections of labelled rows, each value in the words the spec's own documentation uses.

Only what the store holds is shown. The spec is read as stored, not re-validated against today's schema (a store
from an older fedtune, or a hand-written one, still shows), and a key the stored spec lacks reads "not recorded"
rather than a default this version would have used.
"""

from __future__ import annotations

from typing import Any, TypedDict

NOT_RECORDED = "not recorded"
_MISSING = object()
LABELS_SHOWN = 12  # the rest of a long label list stays in the raw spec below the sections


class Row(TypedDict):
    label: str
    value: str


class Section(TypedDict):
    id: str
    title: str
    rows: list[Row]


def _get(spec: dict[str, Any], dotted: str) -> Any:
    node: Any = spec
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _text(value: Any) -> str:
    if value is _MISSING:
        return NOT_RECORDED
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _explained(value: Any, meanings: dict[Any, str]) -> str:
    """`value (what it means)` for the choices whose meaning an operator should not have to look up."""
    text = _text(value)
    meaning = meanings.get(value) if value is not _MISSING and not isinstance(value, (dict, list)) else None
    return f"{text} ({meaning})" if meaning else text


def _row(label: str, value: str) -> Row:
    return Row(label=label, value=value)


def _task(spec: dict[str, Any]) -> list[Row]:
    kind = _get(spec, "task.kind")
    rows = [_row("kind", _text(kind))]
    if kind == "causal-lm":
        prompt = _get(spec, "task.system_prompt")
        meanings = {"": "empty", None: "the chat template's own default"}
        shown = meanings.get(prompt) if prompt is None or isinstance(prompt, str) else None
        return [*rows, _row("system prompt", shown or _text(prompt))]
    labels = _get(spec, "task.labels")
    if isinstance(labels, list):
        more = len(labels) - LABELS_SHOWN
        listed = ", ".join(map(str, labels[:LABELS_SHOWN])) + (f", ... and {more} more" if more > 0 else "")
        rows.append(_row("labels", f"{len(labels)}: {listed}"))
    else:
        rows.append(_row("labels", _text(labels)))
    pooling = {"mean": "mean over real tokens", "cls": "first token, BERT-style", "last": "last real token"}
    head = {
        "label-names": "the base model's features of each label's name: zero-shot, no privacy cost",
        "random": "random",
    }
    prior = {"site": "each site adds its own label frequencies, which never leave it", "none": "none"}
    return [
        *rows,
        _row("pooling", _explained(_get(spec, "task.pooling"), pooling)),
        _row("head initialised from", _explained(_get(spec, "task.head_init"), head)),
        _row("label prior when scoring", _explained(_get(spec, "task.label_prior"), prior)),
    ]


def _base_model(spec: dict[str, Any], run: dict[str, Any]) -> list[Row]:
    pinned = _get(spec, "base_model.fingerprint")
    if pinned is _MISSING or not pinned:
        pinned = run.get("base_fingerprint") or None
    return [
        _row("path", _text(_get(spec, "base_model.path"))),
        _row(
            "fingerprint (SHA-256 of the weights)",
            pinned if pinned else "not pinned: sites do not check that their copy is this one",
        ),
        _row("tokens per example", _text(_get(spec, "base_model.max_length"))),
    ]


def _layers(layers: Any) -> str:
    if layers is None:
        return "every layer"
    return f"top {layers}" if isinstance(layers, int) else _text(layers)


def _lora(spec: dict[str, Any]) -> list[Row]:
    layers = _get(spec, "lora.layers")
    factors = {"b": "FFA-LoRA: A stays at its shared init, only B trains and travels", "ab": "A and B both train"}
    return [
        _row("rank r", _text(_get(spec, "lora.r"))),
        _row("alpha", _text(_get(spec, "lora.alpha"))),
        _row("dropout", _text(_get(spec, "lora.dropout"))),
        _row("target modules", _text(_get(spec, "lora.target_modules"))),
        _row("layers", _layers(layers)),
        _row("factors", _explained(_get(spec, "lora.factors"), factors)),
    ]


def _rounds(spec: dict[str, Any]) -> str:
    rounds, head = _get(spec, "training.rounds"), _get(spec, "training.head.rounds")
    if not isinstance(rounds, int):
        return _text(rounds)
    if _get(spec, "task.kind") == "causal-lm" or not isinstance(head, int):
        return str(rounds)
    head_only = min(head, rounds)
    return f"{rounds} ({head_only} head-only, then {rounds - head_only} LoRA)"


def _training(spec: dict[str, Any]) -> list[Row]:
    per_round = _get(spec, "training.sites_per_round")
    epochs = _get(spec, "training.local_epochs")
    steps = (
        f"{epochs:g} epochs of each site's rows (steps = epochs x rows / batch size)"
        if isinstance(epochs, int | float)
        else _text(_get(spec, "training.local_steps"))
    )
    rows = [
        _row("rounds", _rounds(spec)),
        _row("sites per round", "every connected site" if per_round == 0 else _text(per_round)),
        _row("least sites for a round", _text(_get(spec, "training.min_sites"))),
        _row("DP-SGD steps per site per round", steps),
        _row("batch size (expected, Poisson)", _text(_get(spec, "training.batch_size"))),
        _row("optimizer", _text(_get(spec, "training.optimizer"))),
        _row("learning rate", _text(_get(spec, "training.learning_rate"))),
        _row("server learning rate (FedAvg step)", _text(_get(spec, "training.server_learning_rate"))),
    ]
    if _get(spec, "task.kind") != "causal-lm":
        rows += [
            _row("head rounds: steps per site", _text(_get(spec, "training.head.local_steps"))),
            _row("head rounds: batch fraction of a site's rows", _text(_get(spec, "training.head.batch_fraction"))),
            _row("head rounds: learning rate", _text(_get(spec, "training.head.learning_rate"))),
        ]
    if _get(spec, "privacy.noise") == "distributed":
        rows += [
            _row("distributed head: DP steps in all", _text(_get(spec, "training.head.distributed.steps"))),
            _row("distributed head: sampling rate", _text(_get(spec, "training.head.distributed.sample_rate"))),
            _row("distributed head: learning rate", _text(_get(spec, "training.head.distributed.learning_rate"))),
        ]
    return [
        *rows,
        _row("seed", _text(_get(spec, "training.seed"))),
        _row("round timeout (s)", _text(_get(spec, "training.round_timeout_s"))),
    ]


def _privacy(spec: dict[str, Any]) -> list[Row]:
    noise = _get(spec, "privacy.noise")
    modes = {
        "local": "each site's update carries the noise its own epsilon needs",
        "distributed": "each DP step is one secure sum to which every site adds a share of the noise",
    }
    accountants = {"prv": "privacy random variables, tight", "rdp": "Renyi DP, looser"}
    sigma = _get(spec, "privacy.noise_multiplier")
    if sigma is None:
        sigma_text = (
            "chosen by the server for the run's epsilon"
            if noise == "distributed"
            else "chosen by each site from its remaining budget, so its cap lasts every round"
        )
    else:
        sigma_text = _text(sigma) + ("" if sigma is _MISSING else " (fixed)")
    rows = [_row("noise", _explained(noise, modes))]
    if noise == "distributed":
        target = _get(spec, "privacy.epsilon")
        rows.append(
            _row("epsilon the run spends at each site", _text(target) if target is not None else "the default cap")
        )
    return [
        *rows,
        _row(
            "default epsilon cap",
            _text(_get(spec, "privacy.default_epsilon_cap"))
            + " (for sites without a cap of their own; a site never accepts a looser one than its built-in limit)",
        ),
        _row("delta", _text(_get(spec, "privacy.target_delta"))),
        _row("accountant", _explained(_get(spec, "privacy.accountant"), accountants)),
        _row("clipping norm (per example)", _text(_get(spec, "privacy.max_grad_norm"))),
        _row("noise multiplier sigma", sigma_text),
    ]


def _secagg(spec: dict[str, Any]) -> list[Row]:
    enabled = _get(spec, "secagg.enabled")
    if enabled is False:
        return [_row("enabled", "no: the server sees each site's update in the clear")]
    weighting = {"examples": "by each site's rows, up to the weight cap", "uniform": "every site equally"}
    return [
        _row("enabled", _explained(enabled, {True: "the server learns only the sum of the sites' updates"})),
        _row("update clip range", _text(_get(spec, "secagg.clip_range"))),
        _row("Shamir threshold, fraction of a round's sites", _text(_get(spec, "secagg.threshold_fraction"))),
        _row("weighting", _explained(_get(spec, "secagg.weighting"), weighting)),
        _row("weight cap (rows)", _text(_get(spec, "secagg.weight_cap"))),
        _row("stage timeout (s)", _text(_get(spec, "secagg.stage_timeout_s"))),
    ]


def recipe_sections(spec: dict[str, Any], run: dict[str, Any]) -> list[Section]:
    """The stored federation spec `spec` (parsed JSON) of the run record `run`, as titled sections of rows."""
    return [
        Section(id="task", title="Task", rows=_task(spec)),
        Section(id="base-model", title="Base model", rows=_base_model(spec, run)),
        Section(id="lora", title="LoRA", rows=_lora(spec)),
        Section(id="training", title="Training schedule", rows=_training(spec)),
        Section(id="privacy", title="Privacy", rows=_privacy(spec)),
        Section(id="secagg", title="Secure aggregation", rows=_secagg(spec)),
    ]
