"""`eagle-pipeline` command line (placeholder until the flows land)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("eagle-pipeline: no subcommands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
