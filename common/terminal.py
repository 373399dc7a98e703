"""How every fedtune command prints an error: one red `error:` prefix, then the message exactly as written.

Messages carry file names, TOML keys and site text such as `[peers]` or `a[0]`; rich would read those brackets
as markup and drop them (or fail on them), so the message is escaped and only the prefix is styled.
"""

from __future__ import annotations

from rich.markup import escape


def error_line(message: object) -> str:
    return f"[bold red]error:[/bold red] {escape(str(message))}"
