"""`flower-supernode`, run with the short waits of `fedtune.common.flower_waits`.

`fedtune client start` runs this module in place of Flower's console script: same arguments, same code, same
process (Flower's SuperNode in this interpreter), only the fixed sleeps between polls shortened.
"""

from __future__ import annotations

import sys

from fedtune.common.flower_waits import shorten_supernode_waits
from fedtune.common.processes import exit_with_parent


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    exit_with_parent()  # the agent that started it stops it; a SIGKILLed agent cannot, so the kernel does
    shorten_supernode_waits()
    sys.argv[0] = "flower-supernode"  # Flower's usage and log lines name its own command
    flower_supernode()


if __name__ == "__main__":
    main()
