"""LLM step cost: tokens/s and peak GPU memory of LoRA fine-tuning at Llama 1B, 3B and 8B shapes, DP against non-DP.

A prepared one-shot benchmark for a lent GPU: every number a GPU site needs to size a DP-LoRA round on a real LLM
comes out of one call (`--models 1b 3b 8b --device cuda`), and `--quick` runs the same code on a 2-layer Llama on
a CPU so that the script is exercised (and tested) where no GPU is.

* Models: transformers' `LlamaForCausalLM` with the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B and random
  weights, created directly on the device in bf16 (no download, and no fp32 copy of 8B on the host). Cost depends
  on shapes, not on weight values.
* Training setup, the same in every mode: LoRA r=16, alpha 32 on all seven linear layers of every block (PEFT),
  non-reentrant gradient checkpointing with gradients into the embeddings' output, causal-LM loss (mean token
  NLL per sequence) on random token ids, `--batch` sequences of `--seq` tokens, SGD with momentum (the sites'
  optimizer).
* Modes, one after the other on the same model and the same LoRA start (a lent GPU is exclusive, and two copies of
  an 8B model would not fit anyway, so there is nothing to interleave as `cost.py` does on a shared CPU):
  - `nondp`: one backward pass of the mean loss;
  - `dp-exact`: exact per-example clipping by per-example backward passes (micro-batches of one sequence: its
    LoRA gradient, its global norm, clipped to C, summed), then Gaussian noise sigma * C on the sum, divided by the
    batch, one optimizer step. Works with gradient checkpointing and with a 4-bit base, where Opacus' hooks do not;
  - `dp-ghost`: Opacus ghost clipping (`make_private(..., grad_sample_mode="ghost", criterion=...)`, as the sites
    train), with gradient checkpointing only if a probe shows that Opacus computes the right update under it.
* The probe (every run, tiny model on the CPU, a second or two): the clipped mean gradient of one batch without
  noise from `dp-exact` and from Opacus ghost clipping, with and without checkpointing. With Opacus 1.6 ghost
  clipping under non-reentrant checkpointing raises "Parameter tying is not supported with Ghost Clipping": the
  recomputed forward pass runs Opacus' forward hooks a second time. Then `dp-ghost` runs without checkpointing
  and the reason is recorded with its row.
* `--four-bit`: the 8B shape again with a bitsandbytes NF4 base (double quantisation, bf16 compute: the FlowerTune
  setting, as a `BitsAndBytesConfig`), its random weights quantised on the device; `nondp` and `dp-exact`.
* Each mode: median of `--steps` step times after `--warmup` steps, tokens/s = batch x seq / median, peak memory
  (`torch.cuda.max_memory_allocated` from the mode's first step on, so it includes the resident model; on a CPU
  the process's peak RSS, which only grows). A mode that fails or runs out of memory is recorded with its error.
  The JSON and markdown are rewritten after every mode, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402

from common import (  # noqa: E402
    RESULTS_DIR,
    console,
    environment,
    make_optimizer,
    markdown_table,
    progress,
    quiet,
    resolve_device,
    set_threads,
    sync,
    write_outputs,
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("nondp", "dp-exact", "dp-ghost")
FOUR_BIT_MODES = ("nondp", "dp-exact")  # the 4-bit setting goes with checkpointing, which ghost clipping cannot use
FOUR_BIT_SUFFIX = "-nf4"
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """The dimensions that set a Llama's cost; weights are random."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    name: str


SHAPES = {
    "1b": Shape(2048, 16, 32, 8, 8192, 128256, True, "Llama-3.2-1B"),
    "3b": Shape(3072, 28, 24, 8, 8192, 128256, True, "Llama-3.2-3B"),
    "8b": Shape(4096, 32, 32, 8, 14336, 128256, False, "Llama-3.1-8B"),
    "tiny": Shape(64, 2, 4, 2, 128, 512, True, "tiny 2-layer Llama (smoke test)"),
}


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("1b", "3b", "8b")
    four_bit: tuple[str, ...] = ()  # shapes run again with an NF4 base
    device: str = "cuda"
    seq: int = 512
    batch: int = 8
    warmup: int = 2
    steps: int = 5
    rank: int = 16
    alpha: int = 32
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    learning_rate: float = 1e-3
    seed: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on a GPU (the issue's setting); fp32 on a CPU, where bf16 matmuls are slow and prove nothing."""
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


# -------------------------------------------------------------------------------------------------
# Models


def llama_config(shape: Shape, seq: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=max(seq, 2048),
        use_cache=False,  # training: a KV cache is dead weight (and clashes with checkpointing)
    )


def random_base(shape: Shape, settings: Settings) -> nn.Module:
    """Random weights allocated and initialised on the device in the run's dtype: no fp32 8B on the host, ever."""
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, settings.seq), dtype=settings.dtype)
    return model


def bnb_config(settings: Settings) -> BitsAndBytesConfig:
    """FlowerTune's 4-bit setting: NF4 with double quantisation, computing in the run's dtype."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=settings.dtype,
    )


def quantise_nf4(model: nn.Module, settings: Settings) -> None:
    """Swap every linear layer of the decoder blocks for a bitsandbytes `Linear4bit` holding its weights, quantised.

    What `from_pretrained(..., quantization_config=...)` does while loading a checkpoint, done on weights already on
    the device (there is no checkpoint to load). The embeddings and the LM head stay in the run's dtype, as there.
    """
    import bitsandbytes as bnb

    qc = bnb_config(settings)
    blocks = model.model.layers
    names = [name for name, module in blocks.named_modules() if type(module) is nn.Linear]
    for name in names:  # one layer at a time, so the bf16 and the 4-bit copies of the model never coexist
        dense = blocks.get_submodule(name)
        layer = bnb.nn.Linear4bit(
            dense.in_features,
            dense.out_features,
            bias=dense.bias is not None,
            compute_dtype=qc.bnb_4bit_compute_dtype,
            compress_statistics=qc.bnb_4bit_use_double_quant,
            quant_type=qc.bnb_4bit_quant_type,
            quant_storage=qc.bnb_4bit_quant_storage,
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            dense.weight.data,
            requires_grad=False,
            compress_statistics=qc.bnb_4bit_use_double_quant,
            quant_type=qc.bnb_4bit_quant_type,
            quant_storage=qc.bnb_4bit_quant_storage,
            module=layer,
        )
        layer.weight = weight.to(settings.device)  # quantises
        if dense.bias is not None:
            layer.bias = dense.bias
        blocks.set_submodule(name, layer)
        del dense, weight
    model.is_loaded_in_4bit = True  # PEFT then wraps the 4-bit layers with its bnb LoRA layers


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing, and gradients into the embeddings' output (frozen embeddings would
    otherwise give the checkpointed blocks inputs without grad, and no gradient would reach their LoRA factors).

    transformers 5.x renamed the switch to `activation_checkpointing_enable`; the GPU image may carry an older 5.x.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def disable_checkpointing(model: PeftModel) -> None:
    base = model.get_base_model()
    (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()


def build_model(shape: Shape, settings: Settings, *, four_bit: bool, lora_b_random: bool = False) -> PeftModel:
    """The LoRA model every mode trains. `lora_b_random` (the probe) starts B away from zero, so that both LoRA
    factors get a gradient in the first step and a wrong clipping of either shows."""
    base = random_base(shape, settings)
    if four_bit:
        quantise_nf4(base, settings)
    enable_checkpointing(base)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights=not lora_b_random,
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------
# Loss and the three training steps


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sequence (the privacy unit is a sequence), computed in fp32."""
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.size(0), -1).mean(dim=1)


class SequenceLoss(nn.Module):
    """`sequence_losses` as a criterion with a `reduction`, which Opacus' ghost clipping switches to "none"."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        losses = sequence_losses(logits, ids)
        return losses if self.reduction == "none" else losses.mean()


@dataclass
class Trainer:
    """One mode's optimizer step, ready to time, with whatever the mode can report afterwards."""

    step: Callable[[], None]
    stats: Callable[[], dict[str, Any]] = dict
    close: Callable[[], None] = lambda: None


def nondp_trainer(model: PeftModel, ids: torch.Tensor, settings: Settings) -> Trainer:
    params = trainable(model)
    optimizer = make_optimizer("sgd", params, settings.learning_rate)

    def step() -> None:
        sequence_losses(model(input_ids=ids).logits, ids).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Trainer(step)


def exact_trainer(model: PeftModel, ids: torch.Tensor, settings: Settings) -> Trainer:
    """DP-SGD with exact per-example clipping: one backward pass per sequence.

    Costs batch-size backward passes at micro-batch 1 instead of one, but needs nothing from the model beyond
    autograd, so it runs under gradient checkpointing and on a 4-bit base. No host sync inside the step: norms and
    clip factors stay on the device, and the clipped norms are read once, after timing.
    """
    params = trainable(model)
    optimizer = make_optimizer("sgd", params, settings.learning_rate)
    clip = settings.max_grad_norm
    total = [torch.zeros_like(p) for p in params]
    largest = torch.zeros((), device=settings.device)  # largest clipped per-example norm seen
    clipped: list[torch.Tensor] = []  # 1 where an example's norm exceeded C (the last step's batch)

    def step() -> None:
        nonlocal largest, clipped
        torch._foreach_zero_(total)
        clipped = []
        for i in range(ids.size(0)):
            example = ids[i : i + 1]
            grads = torch.autograd.grad(sequence_losses(model(input_ids=example).logits, example)[0], params)
            norm = torch.nn.utils.get_total_norm(grads)
            factor = (clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_add_(total, torch._foreach_mul(grads, factor))
            largest = torch.maximum(largest, norm * factor)
            clipped.append((factor < 1.0).float())
        for p, g in zip(params, total, strict=True):
            noise = torch.randn_like(g) * (settings.noise_multiplier * clip)
            p.grad = (g + noise) / ids.size(0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def stats() -> dict[str, Any]:
        top = float(largest)
        return {
            "max_clipped_norm": top,
            "clipped_norms_within_c": top <= clip * (1 + 1e-4),
            "clipped_fraction_last_step": float(torch.stack(clipped).mean()) if clipped else None,
        }

    return Trainer(step, stats)


def ghost_trainer(model: PeftModel, ids: torch.Tensor, settings: Settings) -> Trainer:
    """DP-SGD as the sites run it: Opacus ghost clipping, fixed batches (no Poisson sampling: same work per step)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = make_optimizer("sgd", trainable(model), settings.learning_rate)
    dp_model, dp_optimizer, criterion, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(ids.cpu()), batch_size=ids.size(0)),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode="ghost",
        criterion=SequenceLoss(),
    )

    def step() -> None:
        criterion(dp_model(input_ids=ids).logits, ids).backward()  # both passes: norms, then the clipped loss
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)

    return Trainer(step, close=dp_model.to_standard_module)


TRAINERS: dict[str, Callable[[PeftModel, torch.Tensor, Settings], Trainer]] = {
    "nondp": nondp_trainer,
    "dp-exact": exact_trainer,
    "dp-ghost": ghost_trainer,
}


# -------------------------------------------------------------------------------------------------
# Probe: does Opacus ghost clipping give the right update under gradient checkpointing?


def first_update(model: PeftModel, trainer: Trainer) -> list[torch.Tensor]:
    """The change one step makes to the LoRA factors (with SGD, momentum's first step is lr x gradient)."""
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    trainer.step()
    return [b - p.detach() for b, p in zip(before, params, strict=True)]


def ghost_checkpointing_probe(seed: int) -> dict[str, Any]:
    """Opacus ghost clipping against `dp-exact`, without noise, on a tiny model: without checkpointing (validates
    both) and with it (whether `dp-ghost` may run checkpointed). C is small, so that every example is clipped."""
    settings = Settings(device="cpu", seq=16, batch=4, max_grad_norm=0.05, noise_multiplier=0.0, learning_rate=1.0)
    settings = replace(settings, seed=seed)
    ids = torch.randint(0, SHAPES["tiny"].vocab, (settings.batch, settings.seq), generator=generator(seed))

    def update(mode: str, checkpointing: bool) -> list[torch.Tensor]:
        model = build_model(SHAPES["tiny"], settings, four_bit=False, lora_b_random=True)
        if not checkpointing:
            disable_checkpointing(model)
        trainer = TRAINERS[mode](model, ids, settings)
        try:
            return first_update(model, trainer)
        finally:
            trainer.close()

    reference = update("dp-exact", True)
    scale = max(float(r.abs().max()) for r in reference)
    out: dict[str, Any] = {"max_abs_exact_update": scale}
    for checkpointing in (False, True):
        key = "with_checkpointing" if checkpointing else "without_checkpointing"
        try:
            got = update("dp-ghost", checkpointing)
        except Exception as exc:  # the finding itself: Opacus' hooks may reject the recomputed forward pass
            out[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        diff = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
        out[key] = {"ok": diff <= 1e-4 * scale, "max_abs_diff_vs_exact": diff}
    return out


# -------------------------------------------------------------------------------------------------
# Timing


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def peak_memory_gib(device: str) -> dict[str, float]:
    if device.startswith("cuda"):
        return {"peak_gib": torch.cuda.max_memory_allocated() / GIB}
    return {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}  # Linux: KiB


def time_mode(model: PeftModel, trainer: Trainer, settings: Settings, tick: Callable[[], None]) -> dict[str, Any]:
    """Warm-up steps (the first one also gives the update's norm), then `steps` timed steps."""
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    update = first_update(model, trainer)
    tick()
    for _ in range(settings.warmup - 1):
        trainer.step()
        tick()
    samples = []
    for _ in range(settings.steps):
        sync(settings.device)
        t0 = time.perf_counter()
        trainer.step()
        sync(settings.device)
        samples.append(time.perf_counter() - t0)
        tick()
    median = statistics.median(samples)
    return {
        "tokens_per_s": settings.batch * settings.seq / median,
        "median_step_s": median,
        "step_s": samples,
        **peak_memory_gib(settings.device),
        "first_update_norm": float(torch.nn.utils.get_total_norm(update)),
        **trainer.stats(),
    }


def run_mode(
    model: PeftModel, mode: str, ids: torch.Tensor, settings: Settings, tick: Callable[[], None]
) -> dict[str, Any]:
    trainer = TRAINERS[mode](model, ids, settings)
    try:
        return time_mode(model, trainer, settings, tick)
    finally:
        trainer.close()


@dataclass
class Row:
    """One model (a shape, or a shape with an NF4 base) and its modes."""

    label: str
    shape: str
    four_bit: bool
    modes: tuple[str, ...]
    result: dict[str, Any] = field(default_factory=dict)


def load_model(row: Row, settings: Settings) -> PeftModel:
    """The row's model, with what it cost to build and hold recorded in the row."""
    t0 = time.perf_counter()
    model = build_model(SHAPES[row.shape], settings, four_bit=row.four_bit)
    sync(settings.device)
    n_trainable, n_all = model.get_nb_trainable_parameters()  # PEFT counts a 4-bit weight at its unpacked size
    row.result.update({"build_s": time.perf_counter() - t0, "trainable_params": n_trainable, "params": n_all})
    if settings.device.startswith("cuda"):
        row.result["resident_gib"] = torch.cuda.memory_allocated() / GIB
    return model


def run_row(
    row: Row,
    settings: Settings,
    ghost_checkpointing: dict[str, Any],
    save: Callable[[], None],
    tick: Callable[[], None],
) -> None:
    """Build the row's model once, run its modes in order on the same LoRA start; every failure is recorded."""
    shape = SHAPES[row.shape]
    row.result.update({"shape": asdict(shape), "four_bit": row.four_bit, "modes": {}})
    ids = torch.randint(0, shape.vocab, (settings.batch, settings.seq), generator=generator(settings.seed))
    ids = ids.to(settings.device)
    try:
        model = load_model(row, settings)
    except Exception as exc:  # e.g. out of memory for the base itself
        row.result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        free_memory()
        save()
        return
    start = [p.detach().clone() for p in trainable(model)]
    for mode in row.modes:
        entry: dict[str, Any] = {"checkpointing": True}
        if mode == "dp-ghost" and not ghost_checkpointing["with_checkpointing"]["ok"]:
            disable_checkpointing(model)  # ghost runs last: no later mode of this model needs it back
            entry.update(
                checkpointing=False,
                why=ghost_checkpointing["with_checkpointing"].get("error")
                or "the probe's checkpointed ghost update differs from exact clipping",
            )
        with torch.no_grad():
            torch._foreach_copy_(trainable(model), start)  # every mode starts from the same LoRA factors
        try:
            entry.update(run_mode(model, mode, ids, settings, tick))
        except Exception as exc:  # recorded, not fatal: an OOM, or a mode this model cannot run
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        for p in trainable(model):
            p.grad = None
        free_memory()
        row.result["modes"][mode] = entry
        add_ratios(row.result["modes"])
        save()
    del model, start
    free_memory()


def add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    base = modes.get("nondp", {}).get("tokens_per_s")
    for entry in modes.values():
        rate = entry.get("tokens_per_s")
        entry["ratio_to_nondp"] = rate / base if rate and base else None


# -------------------------------------------------------------------------------------------------
# Output


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("transformers", "peft", "opacus", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def render_markdown(payload: dict[str, Any]) -> str:
    env, s = payload["environment"], payload["settings"]
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores)"
    lines = [
        f"# LLM LoRA step cost ({payload['mode']})",
        "",
        f"Device: {where}; {s['dtype']}; batch {s['batch']} x {s['seq']} tokens; LoRA r={s['rank']} alpha "
        f"{s['alpha']} on {', '.join(LORA_TARGETS)}; median of {s['steps']} steps after {s['warmup']} warm-up; "
        f"C={s['max_grad_norm']}, sigma={s['noise_multiplier']}.",
        "",
    ]
    rows = []
    for label, result in payload["results"].items():
        for mode, e in result.get("modes", {}).items():
            peak = e.get("peak_gib", e.get("process_peak_rss_gib"))
            rows.append(
                [
                    label,
                    mode,
                    "yes" if e["checkpointing"] else "no",
                    e.get("tokens_per_s"),
                    e.get("median_step_s"),
                    peak,
                    e.get("ratio_to_nondp"),
                    e.get("error", "")[:80],
                ]
            )
        if "error" in result:
            rows.append([label, "(build)", "-", None, None, None, None, result["error"][:80]])
    memory = "peak GiB" if env["device"].startswith("cuda") else "process peak RSS GiB"
    headers = ["model", "mode", "checkpointing", "tokens/s", "median s/step", memory, "tokens/s / non-DP", "error"]
    lines += [markdown_table(headers, rows), ""]
    probe = payload["ghost_checkpointing_probe"]
    lines.append(
        f"Ghost clipping vs exact per-example clipping (tiny model, no noise): without checkpointing "
        f"{_probe_text(probe['without_checkpointing'])}; with checkpointing {_probe_text(probe['with_checkpointing'])}."
    )
    lines += ["", f"4-bit base: {payload['four_bit']['status']}."]
    for label, result in payload["results"].items():
        exact = result.get("modes", {}).get("dp-exact", {})
        if "max_clipped_norm" in exact:
            lines.append(
                f"{label} dp-exact: largest clipped per-example norm {exact['max_clipped_norm']:.4g} "
                f"(C={s['max_grad_norm']})."
            )
    return "\n".join(lines)


def _probe_text(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"fails ({result['error']})"
    return f"max |diff| {result['max_abs_diff_vs_exact']:.2g} ({'matches' if result['ok'] else 'DIFFERS'})"


def plan(settings: Settings) -> list[Row]:
    rows = [Row(m, m, False, MODES) for m in settings.models]
    rows += [Row(m + FOUR_BIT_SUFFIX, m, True, FOUR_BIT_MODES) for m in settings.four_bit]
    return rows


def four_bit_plan(arg: str, models: Sequence[str], device: str) -> tuple[tuple[str, ...], str]:
    """Which shapes get an NF4 row, and why (recorded: a missing bitsandbytes must show in the results)."""
    if arg == "off":
        return (), "off (--four-bit off)"
    if arg == "auto" and not device.startswith("cuda"):
        return (), "off (auto: CUDA only)"
    if arg == "auto" and "8b" not in models:
        return (), "off (auto: 8b not selected)"
    wanted = ("8b",) if arg == "auto" else (models[-1],)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return (), "bitsandbytes not installed"
    return wanted, f"NF4 base for {', '.join(wanted)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 32 tokens, batch 2, 2 steps (CPU smoke)")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), help="shapes (default 1b 3b 8b; quick: tiny)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--four-bit",
        default="auto",
        choices=["auto", "on", "off"],
        help="auto: an NF4 8B row on CUDA; on: an NF4 row for the last model (quick's default)",
    )
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8)")
    parser.add_argument("--warmup", type=int, help="untimed steps per mode, at least 1 (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps per mode (default 5)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in this process (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output stem (default benchmarks/results/llm, quick: llm-quick)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    set_threads(args.threads)
    models = tuple(args.models or (("tiny",) if args.quick else ("1b", "3b", "8b")))
    four_bit, four_bit_status = four_bit_plan(
        "on" if args.quick and args.four_bit == "auto" else args.four_bit, models, device
    )
    small = {"seq": 32, "batch": 2, "warmup": 1, "steps": 2} if args.quick else {}
    given = {"seq": args.seq, "batch": args.batch, "warmup": args.warmup, "steps": args.steps}
    settings = Settings(
        models=models,
        four_bit=four_bit,
        device=device,
        max_grad_norm=args.max_grad_norm,
        noise_multiplier=args.noise_multiplier,
        seed=args.seed,
        **{**small, **{k: v for k, v in given.items() if v is not None}},
    )
    if settings.warmup < 1 or settings.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    stem = args.out or RESULTS_DIR / ("llm-quick" if args.quick else "llm")
    payload: dict[str, Any] = {
        "benchmark": "llm",
        "mode": "quick" if args.quick else "full",
        "settings": {
            **asdict(settings),
            "dtype": str(settings.dtype).removeprefix("torch."),
            "lora_targets": LORA_TARGETS,
        },
        "environment": {**environment(device), **versions()},
        "four_bit": {"status": four_bit_status},
        "results": {},
    }
    if device.startswith("cuda"):
        payload["environment"]["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    if four_bit:
        payload["four_bit"]["config"] = bnb_config(settings).to_dict()

    def save() -> None:
        payload["wall_s"] = time.monotonic() - started
        write_outputs(stem, payload, render_markdown(payload))

    started = time.monotonic()
    rows = plan(settings)
    with quiet(), progress() as bar:
        task = bar.add_task("probe: ghost clipping under checkpointing", total=1)
        payload["ghost_checkpointing_probe"] = ghost_checkpointing_probe(settings.seed)
        bar.advance(task)
        total = sum(len(r.modes) for r in rows) * (settings.warmup + settings.steps)
        task = bar.add_task("steps", total=total)
        for row in rows:
            bar.update(task, description=f"{row.label} ({', '.join(row.modes)})")
            payload["results"][row.label] = row.result
            run_row(row, settings, payload["ghost_checkpointing_probe"], save, lambda: bar.advance(task))
    save()
    markdown = render_markdown(payload)
    console.print(markdown)
    console.print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')} in {payload['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
