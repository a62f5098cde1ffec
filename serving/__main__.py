"""``python -m serving``: parse flags first (no TensorFlow import), then run the server."""

from __future__ import annotations

import sys

from serving.flags import parse_args


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    from serving.server import run  # imports TensorFlow lazily, after flags are known good

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
