"""`python -m dsan` and the `dsan` command.

Importing the command line imports torch, which takes a second or more: Ctrl-C during it ends
with one line too, as it does once a command runs."""

import sys

from .errors import INTERRUPTED_STATUS


def _load_main():
    from .cli import main

    return main


def run() -> int:
    try:
        main = _load_main()
    except KeyboardInterrupt:
        print("dsan: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    return main()


if __name__ == "__main__":
    sys.exit(run())
