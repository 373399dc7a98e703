"""The adapter as data: PEFT state <-> numpy <-> Flower ArrayRecord <-> PEFT files.

Only these tensors ever cross the wire (besides secure-aggregation keys and
metrics), so one module owns their shape, order and naming. The order of
`AdapterState` keys is the order of the flattened vector that secure
aggregation masks; both sides derive it from the same federation spec.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file

AdapterState = OrderedDict[str, np.ndarray]


class AdapterError(ValueError):
    """An adapter update has the wrong keys, shapes or non-finite values."""


class AdapterRefused(AdapterError):
    """An adapter a site was sent does not fit it: refused on the message alone, before any row is read."""


# No adapter value fedtune's recipes reach comes near this (a head moves by at most lr x momentum gain x steps: tens
# under the defaults), while under it a head gives finite logits on any feature row the site keeps (tasks.tame_rows).
# It does not bound what a LoRA makes of its inputs: those rows are tamed where they are computed.
MAX_RECEIVED_VALUE = 1e4


def adapter_state(model: PeftModel) -> AdapterState:
    """The trainable adapter tensors (LoRA matrices and, for classification, the head)."""
    # never the base model's embeddings or vocabulary projection, which PEFT would add when a target names them:
    # a server could then overwrite frozen, fingerprinted weights with any values (review round 5)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return OrderedDict(
        (name, tensor.detach().to("cpu", torch.float32).numpy().copy()) for name, tensor in state.items()
    )


def load_adapter_state(model: PeftModel, state: AdapterState) -> None:
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise AdapterError(f"adapter keys not in this model: {unexpected[:3]}")


_LAYOUT, _VALUES = "layout", "values"


def to_record(state: AdapterState) -> ArrayRecord:
    """The adapter as two arrays: its layout (names, shapes) and every value in one float32 vector.

    Flower moves each array of a message as separate objects, one request each; a LoRA adapter has dozens of
    tensors (26 for the demo), and a deployed round paid for every one of them at the SuperLink, the SuperNode
    and the site's worker.
    """
    layout = [[name, list(value.shape)] for name, value in state.items()]
    values = flatten(state).astype(np.float32) if state else np.zeros(0, dtype=np.float32)
    return ArrayRecord(
        OrderedDict(
            [
                (_LAYOUT, Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())),
                (_VALUES, Array(values)),
            ]
        )
    )


def from_record(record: ArrayRecord, template: AdapterState | None = None) -> AdapterState:
    """Decode and, given a template, check keys, shapes and finiteness.

    A NaN or a wrong shape from one party must be refused here, before it can
    poison the global adapter for everyone.
    """
    if list(record) != [_LAYOUT, _VALUES]:
        raise AdapterError(f"not an adapter record: arrays {list(record)[:4]}, expected {[_LAYOUT, _VALUES]}")
    try:
        layout = json.loads(record[_LAYOUT].numpy().tobytes().decode())
        names = [str(name) for name, _ in layout]
        shapes = [tuple(int(d) for d in shape) for _, shape in layout]
        if any(d < 0 for shape in shapes for d in shape):
            raise ValueError("negative dimension")
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter layout unreadable: {exc}") from None
    values = record[_VALUES].numpy()
    needed = sum(math.prod(shape) for shape in shapes)
    if values.ndim != 1 or values.size != needed:
        raise AdapterError(f"adapter has {values.size} values, its layout needs {needed}")
    state = _split(values, list(zip(names, shapes, strict=True)))
    if template is not None:
        check_compatible(state, template)
    return state


def check_compatible(state: AdapterState, template: AdapterState) -> None:
    if list(state) != list(template):
        missing = [k for k in template if k not in state]
        extra = [k for k in state if k not in template]
        raise AdapterError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in state.items():
        if value.shape != template[name].shape:
            raise AdapterError(f"{name}: shape {value.shape}, expected {template[name].shape}")
        if not np.all(np.isfinite(value)):
            raise AdapterError(
                f"{name}: contains NaN or infinite values; the update is refused "
                "(lower the learning rate or max_grad_norm)"
            )


def check_received(state: AdapterState, template: AdapterState) -> None:
    """An adapter a site is sent: exactly the site's own keys and shapes, finite, no value past MAX_RECEIVED_VALUE.

    Checked before the site reads a row, so that whether it refuses depends on the message alone. A tensor the
    site's model does not have, a head narrower than its labels or a weight big enough to overflow on some rows
    would otherwise make training fail for exactly the rows a server asks about, and the failure is an answer.
    """
    try:
        check_compatible(state, template)
    except AdapterError as exc:
        raise AdapterRefused(str(exc)) from None
    for name, value in state.items():
        if value.size and float(np.abs(value).max()) > MAX_RECEIVED_VALUE:
            raise AdapterRefused(
                f"{name}: a value beyond {MAX_RECEIVED_VALUE:g}, which sites refuse (no default recipe comes near it; "
                "a federation whose learning rates drive the adapter there should lower them)"
            )


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    return OrderedDict((k, (a[k] - b[k]).astype(np.float32)) for k in a)


def add_scaled(a: AdapterState, b: AdapterState, scale: float) -> AdapterState:
    """a + scale * b; tensors that b lacks (a phase that trains a subset) stay as they are in a."""
    return OrderedDict((k, (a[k] + scale * b[k]).astype(np.float32) if k in b else a[k]) for k in a)


def flatten(state: AdapterState) -> np.ndarray:
    return np.concatenate([v.ravel() for v in state.values()]).astype(np.float64)


def unflatten(vector: np.ndarray, template: AdapterState) -> AdapterState:
    return _split(vector, [(name, value.shape) for name, value in template.items()])


def _split(vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> AdapterState:
    """`vector` cut into float32 tensors of the named shapes, in order (the inverse of `flatten`)."""
    out: AdapterState = OrderedDict()
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = vector[offset : offset + size].reshape(shape).astype(np.float32)
        offset += size
    if offset != vector.size:
        raise AdapterError(f"vector has {vector.size} values, adapter needs {offset}")
    return out


def num_parameters(state: AdapterState) -> int:
    return int(sum(v.size for v in state.values()))


def save_peft_adapter(model: PeftModel, state: AdapterState, out_dir: Path) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`."""
    load_adapter_state(model, state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def save_state(state: AdapterState, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomic checkpoint of a bare adapter state: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(dict(state), str(tmp), metadata={"fedtune": json.dumps(metadata or {})})
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_state(path: Path) -> AdapterState:
    return OrderedDict(load_file(str(path)).items())
