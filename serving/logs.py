"""The server's log format, set up alike in the supervisor and in every worker process."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    """Readable, timestamped logs on stderr (loads, warmups, unloads, failures), each line naming
    the process it came from."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(processName)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
