"""`flower-supernode`, run with the short waits of `fedtune.common.flower_waits`.

`fedtune client start` runs this module in place of Flower's console script: same arguments, same code, same
process (Flower's SuperNode in this interpreter), only the fixed sleeps between polls shortened.
"""

from __future__ import annotations

import sys

from fedtune.common.flower_waits import shorten_supernode_waits


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    shorten_supernode_waits()
    sys.argv[0] = "flower-supernode"  # Flower's usage and log lines name its own command
    flower_supernode()


if __name__ == "__main__":
    main()
