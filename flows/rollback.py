"""The flow ``rollback``: every replica back to the previous champion, in one command.

    python -m flows.rollback [--config FILE] [--set section.key=value ...] [--to champion]

``--to champion`` returns them to the champion itself, aliases unchanged: after a run killed
between its publish and its promote, the version it left serving unverified goes.

or the deployment ``rollback`` (``prefect deployment run rollback/rollback``). It takes the
concurrency limit every training run holds, so it never races a push; what it does is
``tasks.champion.roll_back_champion``.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow
from prefect.concurrency.sync import concurrency

from tasks.champion import roll_back_champion
from tasks.config import CONCURRENCY_LIMIT, ConfigError, load_config
from tasks.push import PushError
from tasks.tracking import CHAMPION, PREVIOUS_CHAMPION


@flow(name="rollback")
def rollback(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    to: str = PREVIOUS_CHAMPION,
) -> str:
    cfg = load_config(config_path, overrides or [])
    with concurrency(CONCURRENCY_LIMIT, occupy=1):
        return roll_back_champion(cfg, to)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.rollback", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", help="YAML configuration (default: configs/mnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--to",
        choices=[PREVIOUS_CHAMPION, CHAMPION],
        default=PREVIOUS_CHAMPION,
        help="the alias whose version every replica returns to (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        load_config(args.config, args.overrides)
        print(rollback(args.config, args.overrides, args.to))
    except (ConfigError, PushError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
