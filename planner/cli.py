"""prima-plan: solve the layer assignment from device profiles (issue 5)."""

from prima_ref._pending import pending


def main(argv=None) -> int:
    return pending("prima-plan", 5)


if __name__ == "__main__":
    raise SystemExit(main())
