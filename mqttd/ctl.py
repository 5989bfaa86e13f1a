"""``mqttd ctl``: a placeholder until the operator client over the HTTP API lands (written
in parallel; this file is replaced by it)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("mqttd ctl: not yet", file=sys.stderr)
    return 1
