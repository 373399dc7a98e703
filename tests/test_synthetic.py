"""The built-in demo data and the non-IID partitioner it is split with."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.data import load_classification, read_rows
from fedtune.common.partition import dirichlet_partition
from fedtune.common.synthetic import (
    BANK_INTENTS,
    generate_bank_instructions,
    generate_bank_messages,
    write_demo_sites,
)

# ----------------------------------------------------------------------------------------------------
# Partition


def balanced_labels(n: int, k: int) -> list[int]:
    return [i % k for i in range(n)]


def assert_exact(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)), "parts must cover every row exactly once"


def test_partition_is_exact_and_deterministic() -> None:
    labels = balanced_labels(1000, 10)
    parts = dirichlet_partition(labels, 5, alpha=0.5, seed=7)
    assert len(parts) == 5
    assert_exact(parts, 1000)
    assert parts == dirichlet_partition(labels, 5, alpha=0.5, seed=7)
    assert parts != dirichlet_partition(labels, 5, alpha=0.5, seed=8)
    assert all(p == sorted(p) for p in parts)


def label_distributions(labels: list[int], parts: list[list[int]], k: int) -> np.ndarray:
    counts = np.array([[Counter(labels[i] for i in p)[c] for c in range(k)] for p in parts], dtype=float)
    return counts / counts.sum(axis=1, keepdims=True)


def test_partition_is_non_iid_and_alpha_controls_skew() -> None:
    labels = balanced_labels(2000, 10)
    skewed = label_distributions(labels, dirichlet_partition(labels, 4, alpha=0.1, seed=0), 10)
    even = label_distributions(labels, dirichlet_partition(labels, 4, alpha=1000.0, seed=0), 10)
    # total-variation distance of each part from the global (uniform) label distribution
    tv_skewed = 0.5 * np.abs(skewed - 0.1).sum(axis=1)
    tv_even = 0.5 * np.abs(even - 0.1).sum(axis=1)
    assert tv_skewed.mean() > 0.3
    assert tv_even.mean() < 0.1
    assert not np.allclose(skewed[0], skewed[1], atol=0.05)


@pytest.mark.parametrize(
    ("n", "parts", "alpha", "min_size"), [(200, 10, 0.05, 15), (100, 5, 0.01, 20), (55, 5, 0.1, 11)]
)
def test_partition_respects_min_size(n: int, parts: int, alpha: float, min_size: int) -> None:
    labels = balanced_labels(n, 4)
    result = dirichlet_partition(labels, parts, alpha, seed=1, min_size=min_size)
    assert_exact(result, n)
    assert min(len(p) for p in result) >= min_size


def test_partition_arbitrary_label_values() -> None:
    labels = [7, -1, 42] * 30
    assert_exact(dirichlet_partition(labels, 3, 0.3, seed=0, min_size=5), 90)


def test_partition_impossible_or_invalid() -> None:
    with pytest.raises(ValueError, match="at least 10 rows"):
        dirichlet_partition(balanced_labels(25, 2), 3, 0.5, seed=0)
    with pytest.raises(ValueError):
        dirichlet_partition([0, 1], 0, 0.5, seed=0, min_size=0)
    with pytest.raises(ValueError):
        dirichlet_partition([0, 1], 2, 0.0, seed=0, min_size=0)
    assert dirichlet_partition([0, 1, 1], 1, 0.5, seed=0, min_size=0) == [[0, 1, 2]]


# ----------------------------------------------------------------------------------------------------
# Synthetic bank messages


def test_intents() -> None:
    assert len(BANK_INTENTS) >= 8 and len(set(BANK_INTENTS)) == len(BANK_INTENTS)


def test_messages_deterministic_by_seed() -> None:
    assert generate_bank_messages(200, seed=1) == generate_bank_messages(200, seed=1)
    assert generate_bank_messages(200, seed=1)[0] != generate_bank_messages(200, seed=2)[0]


def test_messages_balanced_all_intents_mostly_unique() -> None:
    texts, labels = generate_bank_messages(1003, seed=0)
    assert len(texts) == len(labels) == 1003
    counts = Counter(labels)
    assert set(counts) == set(range(len(BANK_INTENTS)))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len(set(texts)) / len(texts) > 0.85
    assert all(t.strip() for t in texts)


def test_intent_is_learnable_from_words() -> None:
    # A bag-of-words nearest-centroid classifier must beat chance by far: a small encoder will too.
    train_x, train_y = generate_bank_messages(2000, seed=0)
    test_x, test_y = generate_bank_messages(500, seed=1)
    vocab = {w: i for i, w in enumerate(sorted({w for t in train_x for w in t.lower().split()}))}

    def bow(texts: list[str]) -> np.ndarray:
        m = np.zeros((len(texts), len(vocab)))
        for r, t in enumerate(texts):
            for w in t.lower().split():
                if w in vocab:
                    m[r, vocab[w]] = 1.0
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)

    xtr, xte = bow(train_x), bow(test_x)
    centroids = np.stack([xtr[np.array(train_y) == c].mean(axis=0) for c in range(len(BANK_INTENTS))])
    accuracy = float(np.mean((xte @ centroids.T).argmax(axis=1) == np.array(test_y)))
    assert accuracy > 0.8


def test_instructions_match_messages() -> None:
    prompts, responses = generate_bank_instructions(50, seed=3)
    assert prompts == generate_bank_messages(50, seed=3)[0]
    assert len(responses) == 50 and all(r.strip() for r in responses)
    assert (prompts, responses) == generate_bank_instructions(50, seed=3)


def test_write_demo_sites_load_back(tmp_path: Path) -> None:
    paths = write_demo_sites(tmp_path / "demo", num_sites=3, rows_per_site=60, alpha=0.3, seed=5)
    assert [p.name for p in paths] == ["site-1.csv", "site-2.csv", "site-3.csv"]
    datasets = [load_classification(p, "text", "label", BANK_INTENTS) for p in paths]
    assert sum(len(d) for d in datasets) == 180
    assert all(len(d) >= 10 for d in datasets)
    assert set(read_rows(paths[0], ["text", "label"])[0]) == {"text", "label"}
    assert paths[0].read_text(encoding="utf-8").splitlines()[0] == "text,label"
    all_texts = sorted(t for d in datasets for t in d.texts)
    assert all_texts == sorted(generate_bank_messages(180, seed=5)[0])
    # same call, same bytes
    again = write_demo_sites(tmp_path / "again", num_sites=3, rows_per_site=60, alpha=0.3, seed=5)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
