"""`python -m worker.stack up|down|status`.

`up` prints exactly two `export` lines on stdout, so `eval "$(python -m worker.stack up)"` points
a shell at the stack; everything else (progress, errors) goes to stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from worker.config import ENV_DATABASE_URL, ENV_KAFKA_BOOTSTRAP
from worker.stack import down, status, up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            endpoints = up()
            print(f"export {ENV_KAFKA_BOOTSTRAP}={shlex.quote(endpoints.kafka_bootstrap)}")
            print(f"export {ENV_DATABASE_URL}={shlex.quote(endpoints.database_url)}")
        elif args.command == "down":
            down()
        else:
            for line in status():
                print(line)
    except RuntimeError as error:
        print(f"stack: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
