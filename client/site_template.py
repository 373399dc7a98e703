"""The commented site config that `fedtune client init` writes.

A site administrator edits this file, not our code, so every field of
`SiteSpec` is explained where it is set (a test keeps the two in sync).
"""

from __future__ import annotations

SITE_TEMPLATE = """\
# fedtune site configuration for "{name}".
# Check it with:  fedtune client check site.toml --federation federation.toml
# Relative paths are relative to this file.

# This site's name as the federation knows it (letters, digits, '.', '_', '-').
name = "{name}"

# Total epsilon (record-level differential privacy) this site allows per dataset, across every
# round, run and federation. The site declines any round that would exceed it. Left out: 8, or the
# federation's privacy.default_epsilon_cap where that is smaller (never a looser one).
epsilon_cap = 8.0

# Most epsilon one run may add. Without it a run plans to spend all that is left of the cap,
# leaving nothing for the next federation.
# epsilon_per_run = 2.0

# The window epsilon_per_run is measured over, by this site's clock: every spend of the last this
# many hours counts, whatever run ids the server uses (a fresh run id gets no fresh allowance).
# epsilon_window_hours = 24.0

# The delta of this site's (epsilon, delta) guarantee. The ledger accounts at this delta (or at the
# federation's privacy.target_delta when that is smaller); a federation asking for a larger delta is
# declined, because a larger delta would make the same training look cheaper. Keep it below 1 / rows.
privacy_delta = 1e-5

# This site's copy of the base model (Hugging Face folder with *.safetensors). Its fingerprint
# must equal the federation's. Leave it out to use the path named in the federation file.
# base_model_path = "/opt/models/all-MiniLM-L6-v2"

# Where training runs: "cpu", "cuda" or "auto" (cuda when available).
device = "cpu"

# Seeds DP noise, Poisson sampling and the held-out split, for simulations and benchmarks that must
# repeat exactly. Leave it unset on a real site: the noise then comes from fresh entropy, and the
# held-out split from a seed this site draws once and keeps in STATE_DIR/split-seed (never the server's).
# seed = 0

# Privacy ledger (ledger.sqlite) and its high-water mark (ledger.hwm), egress audit log
# (egress.jsonl), split seed and keys live here. Back the ledger up with
# `fedtune client ledger backup site.toml FILE`: a lost ledger stops training until it is restored.
state_dir = '{root}/state'

# This site's Ed25519 identity key for secure aggregation (PEM, must be chmod 600).
# Default: STATE_DIR/identity.pem. Its public key is printed by `fedtune client init`.
identity_key = '{root}/state/identity.pem'

# Secure aggregation: refuse any round whose Shamir threshold t is not above this fraction of its
# sites. Above 2/3, the server must collude with 2t - n of a round's n sites (more than n/3; with
# t = n, all the others) to isolate this site's update, even if it shows sites different survivor
# lists. Lower it only if you trust the operator.
threshold_floor = 0.6667

# Refuse any secure sum of fewer sites than this. In a sum of two, each site learns the other's
# update by subtracting its own: set 2 only for a two-site federation, knowingly.
min_round_sites = 3

# Distributed noise (a federation with privacy.noise = "distributed"): each DP step is one secure sum
# and this site adds 1/h of the step's noise, so that h honest sites' shares carry the noise of one
# centralised step. h counts this site; the site refuses sums of fewer than h sites, is charged the
# epsilon that holds if h sites are honest, and its ledger also records the epsilon of its own share
# alone. Unset: this site declines distributed noise.
# min_honest_sites = 3

# Rounds without secure aggregation show the server this site's (DP-noised) update and row count.
# Declined unless this is true: the server cannot downgrade the site.
allow_plaintext = false

# Held-out figures are exact (no DP noise). By default none leave this site. secure_scores = true
# adds them (correct answers, rows, loss) to the round's secure sum: the server sees federation
# totals, and a server that drops this site between two rounds learns its figures for them.
# share_eval_metrics = true also sends this site's own figures in plaintext. Either way at most once
# per round the site trains in, never scored with the site's label prior, and at most
# max_score_releases times per dataset over every run (each is an exact query with the server's adapter).
secure_scores = false
share_eval_metrics = false
max_score_releases = 100

[data]
# Training rows: CSV, TSV, JSONL or Parquet. Errors name the file, line and column.
train = '{root}/data/train.csv'
# Names this data's privacy budget. Without it the budget is found from the rows themselves: a file
# sharing any row with one trained on before (re-saved, reordered, extended) pays that file's history.
# Set it to tie files with different rows about the same people to one budget.
# dataset_name = "customer-messages"
# Held-out rows for evaluation; without it, eval_fraction of the train rows are held out.
# eval = '{root}/data/eval.csv'
eval_fraction = 0.2
# Column names. Classification reads text_column + label_column (label names or indices);
# causal-lm reads prompt_column + response_column.
text_column = "text"
label_column = "label"
prompt_column = "prompt"
response_column = "response"

[peers]
# Pinned Ed25519 public keys (hex) of EVERY site in the federation, this one included, exchanged
# out of band (e.g. signed e-mail). Secure aggregation aborts if the server relays any other key.
"{name}" = "{public_key}"
# "other-site" = "64 hex characters from that site's `fedtune client init`"
"""
