"""prima-cli: run a model alone or as one rank of a ring (issues 3 and 6)."""

from prima_ref._pending import pending


def main(argv=None) -> int:
    return pending("prima-cli", 3)


if __name__ == "__main__":
    raise SystemExit(main())
