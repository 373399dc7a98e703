"""`fedtune client check`: everything a site can verify before it connects, and what it will share.

Each check returns a `Finding`; an error blocks `start`, a warning does not.
Messages name the file and the fix, because the reader is a site's IT team.
"""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedtune.client.agent import NODE_KEY_NAME
from fedtune.common.config import SITE_EPSILON_CAP, FederationSpec, SiteSpec

# What the ClientApp puts in its replies (see client_app.py); listed so the site sees it before joining.
# Privacy accounting, sent in plaintext after every round; nothing computed from the rows without DP noise.
TRAIN_METRICS = ("epsilon", "epsilon-cap")
# A site's own held-out figures: sent only without secure aggregation or where the site opts in.
EVAL_METRICS = ("num-examples", "eval-loss", "eval-accuracy | eval-perplexity")


@dataclass(frozen=True)
class Finding:
    level: str  # "ok" | "warn" | "error"
    topic: str
    message: str


@dataclass
class Share:
    name: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)

    def add(self, level: str, topic: str, message: str) -> None:
        self.findings.append(Finding(level, topic, message))

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)


def check_data(site: SiteSpec, spec: FederationSpec, report: CheckReport) -> None:
    from fedtune.common.data import DataFileError, load_classification, load_instructions

    d = site.data
    for role, path in (("train", d.train), ("eval", d.eval)):
        if path is None:
            continue
        try:
            if spec.task.kind == "classification":
                data = load_classification(path, d.text_column, d.label_column, spec.task.labels)
                counts = Counter(spec.task.labels[i] for i in data.labels)
                top = ", ".join(f"{k}: {v}" for k, v in counts.most_common(4))
                report.add(
                    "ok", f"data.{role}", f"{path}: {len(data)} rows ({top}{', ...' if len(counts) > 4 else ''})"
                )
            else:
                pairs = load_instructions(path, d.prompt_column, d.response_column)
                report.add("ok", f"data.{role}", f"{path}: {len(pairs)} prompt/response pairs")
        except DataFileError as exc:
            report.add("error", f"data.{role}", str(exc))


def check_model(site: SiteSpec, spec: FederationSpec, report: CheckReport) -> bool:
    from fedtune.common.model import BaseModelError, fingerprint_model

    path = site.base_model_path or spec.base_model.path
    try:
        actual = fingerprint_model(path)
    except BaseModelError as exc:
        report.add("error", "base model", f"{exc}; set base_model_path in the site config to your local copy")
        return False
    expected = spec.base_model.fingerprint
    if expected is None:
        report.add(
            "warn",
            "base model",
            f"{path}: fingerprint {actual[:16]}...; the federation file pins none, so the server's copy decides "
            "at run time (ask the operator to set base_model.fingerprint)",
        )
    elif actual != expected:
        report.add(
            "error",
            "base model",
            f"{path}: fingerprint {actual[:16]}... differs from the federation's {expected[:16]}...; "
            "install the exact checkpoint the operator named",
        )
        return False
    else:
        report.add("ok", "base model", f"{path}: fingerprint matches the federation ({actual[:16]}...)")
    return True


def check_keys(site: SiteSpec, spec: FederationSpec, report: CheckReport) -> None:
    from fedtune.common.secagg.errors import SecAggConfigError
    from fedtune.common.secagg.keys import load_identity_key, public_key_from_hex, public_key_to_hex

    key_path = site.identity_key_path
    own_hex = None
    if not key_path.is_file():
        report.add("error", "identity key", f"{key_path}: not found; run `fedtune client init` or fix identity_key")
    else:
        try:
            own_hex = public_key_to_hex(load_identity_key(key_path))
            report.add("ok", "identity key", f"{key_path} (public {own_hex})")
        except (SecAggConfigError, ValueError) as exc:
            report.add("error", "identity key", str(exc))
    bad = []
    for name, value in site.peers.items():
        try:
            public_key_from_hex(value)
        except SecAggConfigError:
            bad.append(name)
    if bad:
        report.add("error", "peers", f"invalid public key(s) for {', '.join(bad)}: expected 64 hex characters each")
    if spec.secagg.enabled:
        if site.name not in site.peers:
            report.add("error", "peers", f"[peers] must list this site ({site.name}) with its own public key")
        elif own_hex is not None and site.peers[site.name].strip().lower() != own_hex:
            report.add("error", "peers", f"[peers].{site.name} is not the public key of {key_path}")
        others = [n for n in site.peers if n != site.name]
        if len(others) < 1:
            report.add("error", "peers", "secure aggregation needs the pinned keys of the other sites in [peers]")
        elif not bad:
            report.add("ok", "peers", f"{len(others)} other site(s) pinned: {', '.join(sorted(others))}")
    node_key = Path(site.state_dir) / NODE_KEY_NAME
    if node_key.is_file():
        mode = node_key.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            report.add("error", "supernode key", f"{node_key}: readable by others; run `chmod 600 {node_key}`")
        else:
            report.add("ok", "supernode key", f"{node_key}.pub is what the operator registers")
    else:
        report.add("warn", "supernode key", f"{node_key}: not found; `fedtune client init` creates it")


EXPIRY_WARNING = dt.timedelta(days=30)


def _validity(what: str, cert: x509.Certificate, report: CheckReport, now: dt.datetime) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end:
        report.add(
            "error",
            "tls",
            f"{what} is not valid now (valid {start:%Y-%m-%d} to {end:%Y-%m-%d}); "
            "ask the operator for a new one (`fedtune server certs`)",
        )
        return False
    if end - now < EXPIRY_WARNING:
        report.add("warn", "tls", f"{what} expires on {end:%Y-%m-%d}; ask the operator to renew it")
    return True


def check_tls(
    root_certificates: Path | None,
    trusted_entities: Path | None,
    report: CheckReport,
    superlink: str | None = None,
) -> None:
    """The CA must be valid now, and the SuperLink's certificate (fetched when `superlink` is given) must be
    signed by that very CA: a certificate with the same subject from another CA is refused."""
    now = dt.datetime.now(dt.UTC)
    ca = None
    if root_certificates is None:
        report.add("warn", "tls", "no --root-certificates given: `fedtune client start` will need the operator's CA")
    else:
        try:
            ca = x509.load_pem_x509_certificate(Path(root_certificates).read_bytes())
            if _validity(f"CA {root_certificates}", ca, report, now):
                report.add("ok", "tls", f"{root_certificates}: CA '{ca.subject.rfc4514_string()}'")
        except FileNotFoundError:
            report.add("error", "tls", f"{root_certificates}: file not found")
        except ValueError as exc:
            report.add("error", "tls", f"{root_certificates}: not a PEM certificate ({exc})")
    if ca is not None and superlink:
        host, _, port = superlink.rpartition(":")
        try:
            server = x509.load_pem_x509_certificate(ssl.get_server_certificate((host, int(port)), timeout=10).encode())
        except (OSError, ValueError) as exc:
            report.add("warn", "tls", f"could not fetch the SuperLink's certificate from {superlink}: {exc}")
        else:
            try:
                server.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                report.add(
                    "error",
                    "tls",
                    f"the certificate {superlink} presents is not signed by {root_certificates}: wrong CA file, or "
                    "not the operator's SuperLink; get ca.pem from the operator again (out of band)",
                )
            else:
                if _validity(f"SuperLink certificate of {superlink}", server, report, now):
                    report.add("ok", "tls", f"{superlink} presents a certificate signed by this CA")
    if trusted_entities is None:
        report.add("warn", "app signing", "no --trusted-entities: the site would run any app the SuperLink sends")
        return
    try:
        import yaml
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key

        entries = yaml.safe_load(Path(trusted_entities).read_text())
        if not isinstance(entries, dict) or not entries:
            raise ValueError("expected a mapping `key-id: 'ssh-ed25519 ...'`")
        for kid, key in entries.items():
            if not isinstance(load_ssh_public_key(str(key).encode()), Ed25519PublicKey):
                raise ValueError(f"{kid} is not an Ed25519 key")
        report.add("ok", "app signing", f"{trusted_entities}: trusts {', '.join(map(str, entries))}")
    except FileNotFoundError:
        report.add("error", "app signing", f"{trusted_entities}: file not found")
    except (ValueError, yaml.YAMLError) as exc:
        report.add("error", "app signing", f"{trusted_entities}: {exc}")


def check_privacy(site: SiteSpec, spec: FederationSpec, report: CheckReport) -> None:
    cap = site.cap_under(spec)
    source = "site" if site.epsilon_cap else f"default (the stricter of {SITE_EPSILON_CAP:g} and the federation's)"
    fed_delta = spec.privacy.target_delta
    if fed_delta > site.privacy_delta:
        report.add(
            "error",
            "privacy",
            f"the federation asks for privacy.target_delta = {fed_delta:g}, larger than this site's privacy_delta "
            f"= {site.privacy_delta:g}: the site would decline every round. Ask the operator to set "
            f"privacy.target_delta <= {site.privacy_delta:g} (or raise privacy_delta, a policy decision)",
        )
        return
    delta = min(site.privacy_delta, fed_delta)
    report.add(
        "ok",
        "privacy",
        f"epsilon cap {cap:g} per dataset ({source}), accounted at delta {delta:g} "
        f"(site privacy_delta {site.privacy_delta:g}, federation target_delta {fed_delta:g})",
    )


def check_ledger(site: SiteSpec, report: CheckReport) -> None:
    """The ledger must be readable and hold at least what its high-water mark recorded (it fails closed)."""
    from fedtune.client.ledger import verify

    result = verify(Path(site.state_dir) / "ledger.sqlite")
    report.add("ok" if result.ok else "error", "privacy ledger", "; ".join(result.lines))


def shared_tensors(spec: FederationSpec, site: SiteSpec) -> list[Share]:
    """The adapter tensors (names, shapes, bytes) every update carries, from the real model."""
    from fedtune.common.adapter import adapter_state
    from fedtune.common.model import load_lora_model

    local = spec
    if site.base_model_path is not None:
        local = spec.model_copy(
            update={"base_model": spec.base_model.model_copy(update={"path": site.base_model_path})}
        )
    state = adapter_state(load_lora_model(local).model)
    return [Share(name, tuple(int(d) for d in a.shape), int(a.size) * 4) for name, a in state.items()]


def run_checks(
    site: SiteSpec,
    spec: FederationSpec,
    *,
    root_certificates: Path | None = None,
    trusted_entities: Path | None = None,
    inspect_model: bool = True,
    superlink: str | None = None,
) -> CheckReport:
    report = CheckReport()
    check_data(site, spec, report)
    model_ok = check_model(site, spec, report)
    check_keys(site, spec, report)
    check_tls(root_certificates, trusted_entities, report, superlink)
    check_privacy(site, spec, report)
    check_ledger(site, report)
    if model_ok and inspect_model:
        report.shares = shared_tensors(spec, site)
    return report
