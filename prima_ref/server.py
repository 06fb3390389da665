"""prima-server: OpenAI-compatible HTTP API on rank 0 (issue 7)."""

from prima_ref._pending import pending


def main(argv=None) -> int:
    return pending("prima-server", 7)


if __name__ == "__main__":
    raise SystemExit(main())
