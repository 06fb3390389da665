"""The README's main job on the default model: what exists of fetch -> profile -> plan -> ring."""

import sys

from prima_ref import fetch


def main() -> int:
    path = fetch.fetch(fetch.DEFAULT_MODEL)
    print(f"[demo] model: {path}")
    print("[demo] profile, plan and ring run are not built yet (issues 4-6)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
