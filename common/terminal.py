"""How every fedtune command prints an error: one red `error:` prefix, then the message exactly as written.

Messages carry file names, TOML keys and site text such as `[peers]` or `a[0]`; rich would read those brackets
as markup and drop them (or fail on them), so the message is escaped and only the prefix is styled.
"""

from __future__ import annotations

import logging
import os
import warnings

from rich.markup import escape


def error_line(message: object) -> str:
    return f"[bold red]error:[/bold red] {escape(str(message))}"


# Third-party notices a fedtune user cannot act on, which would break into the progress display: each names the
# library and the text it prints, so a release that changes it shows again rather than hiding something new.
_QUIET_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers 5, inside PEFT
    (FutureWarning, r"Tip: In future versions of Ray"),  # Ray, on accelerator env vars for CPU actors
    (UserWarning, r"Optimal order is the (largest|smallest) alpha"),  # Opacus RDP: fedtune accounts with PRV
    # torch, under Opacus' hooks, when the trained layers read cached states that need no gradient (upper_layers)
    (UserWarning, r"Full backward hook is firing when gradients are computed with respect to module outputs"),
)
_QUIET_LOGS = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated",)  # flwr, until it is replaced


class _DropKnownNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _QUIET_LOGS)


def quiet_third_party_notices() -> None:
    """Silence the known notices above (warnings and Flower's log), in this process and the workers it starts."""
    for category, message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # the setting Ray's tip asks for
    flwr = logging.getLogger("flwr")
    if not any(isinstance(f, _DropKnownNotices) for f in flwr.filters):
        flwr.addFilter(_DropKnownNotices())
