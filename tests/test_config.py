"""Configuration files are validated before anything runs, with errors that name file and key."""

from pathlib import Path

import pytest

from fedtune.common.config import ConfigError, load_federation, load_site

FEDERATION = """
name = "banks"
[base_model]
path = "models/minilm"
[task]
kind = "classification"
labels = ["a", "b"]
[training]
rounds = 2
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_federation_resolves_paths_relative_to_the_file(tmp_path):
    spec = load_federation(write(tmp_path, "fed.toml", FEDERATION))
    assert spec.base_model.path == tmp_path / "models/minilm"
    assert spec.training.rounds == 2
    assert spec.secagg.enabled  # secure aggregation is on unless the operator turns it off


def test_unknown_key_is_refused_with_its_location(tmp_path):
    path = write(tmp_path, "fed.toml", FEDERATION + "\n[privacy]\nepsilon_cpa = 3\n")
    with pytest.raises(ConfigError) as err:
        load_federation(path)
    assert str(path) in str(err.value)
    assert "privacy.epsilon_cpa" in str(err.value)


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ('labels = ["a"]', "task"),
        ('labels = ["a", "a"]', "task"),
    ],
)
def test_bad_labels(tmp_path, patch, where):
    text = FEDERATION.replace('labels = ["a", "b"]', patch)
    with pytest.raises(ConfigError, match=where):
        load_federation(write(tmp_path, "fed.toml", text))


def test_out_of_range_values_name_the_key(tmp_path):
    text = FEDERATION.replace("rounds = 2", "rounds = 0\nbatch_size = -1")
    with pytest.raises(ConfigError) as err:
        load_federation(write(tmp_path, "fed.toml", text))
    assert "training.rounds" in str(err.value)
    assert "training.batch_size" in str(err.value)


def test_sites_per_round_below_min_sites_is_refused(tmp_path):
    text = FEDERATION.replace("rounds = 2", "rounds = 2\nsites_per_round = 1\nmin_sites = 2")
    with pytest.raises(ConfigError, match="sites_per_round"):
        load_federation(write(tmp_path, "fed.toml", text))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_federation(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_federation(write(tmp_path, "bad.toml", "name = \n"))


def test_site_config(tmp_path):
    path = write(
        tmp_path,
        "site.toml",
        'name = "bank-a"\nepsilon_cap = 3.0\n[data]\ntrain = "data/train.csv"\n[peers]\nbank-a = "00"\n',
    )
    site = load_site(path)
    assert site.data.train == tmp_path / "data/train.csv"
    assert site.identity_key_path == Path(".fedtune/site/identity.pem")
    bad = write(tmp_path, "bad.toml", 'name = "bank a!"\n[data]\ntrain = "x.csv"\n')
    with pytest.raises(ConfigError, match="name"):
        load_site(bad)
    negative = write(tmp_path, "neg.toml", 'name = "b"\nepsilon_cap = -1\n[data]\ntrain = "x.csv"\n')
    with pytest.raises(ConfigError, match="epsilon_cap"):
        load_site(negative)


def test_documented_example_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "deploy" / "config"
    spec = load_federation(root / "federation.toml")
    assert spec.secagg.enabled and spec.task.kind == "classification"
    site = load_site(root / "site.toml")
    assert site.name in site.peers
