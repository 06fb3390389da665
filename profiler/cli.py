"""profile-tool: profile this device and a model (issue 4)."""

from prima_ref._pending import pending


def main(argv=None) -> int:
    return pending("profile-tool", 4)


if __name__ == "__main__":
    raise SystemExit(main())
