"""Honest exits for commands whose issue has not landed yet."""

import sys


def pending(command: str, issue: int) -> int:
    print(f"{command}: not available yet in prima-ref (tracked as issue {issue})", file=sys.stderr)
    return 2
