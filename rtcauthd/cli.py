"""The ``rtcauth`` console script: one dispatcher for the operator's helper commands.

Each command lives in its own module, listed in :data:`COMMANDS`, and provides

- ``HELP``: one line for ``rtcauth --help``;
- ``configure_parser(parser)``: adds its arguments to an :class:`ArgumentParser`;
- ``run(args) -> int``: does the work and returns the exit status.

``rtcauth --help`` imports every listed module, so a command keeps heavy imports (Twisted,
the daemon's wiring) inside ``run``: ``rtcauth healthcheck`` runs every few seconds as a
container or systemd probe and must stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Optional, Sequence

from rtcauthd import __version__

#: (command name, module): add a line here to add a command.
COMMANDS: tuple[tuple[str, str], ...] = (("healthcheck", "rtcauthd.healthcheck"), ("doctor", "rtcauthd.doctor"))

#: Exit status for usage errors. Not argparse's 2: Docker reserves HEALTHCHECK status 2.
USAGE_ERROR = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error exits with :data:`USAGE_ERROR` instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def positive_seconds(text: str) -> float:
    """argparse type for ``--timeout``: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="rtcauth",
        description="Operator commands for rtcauthd, the MatrixRTC authorization service.",
    )
    parser.add_argument("--version", action="version", version=f"rtcauth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        command = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure_parser(command)
        command.set_defaults(run=module.run)
    return parser


def run_command_module(module, argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rtcauthd.<command>``: one command without the dispatcher."""
    spec = getattr(module, "__spec__", None)  # run as -m, the module is "__main__"
    name = spec.name if spec is not None and spec.name else module.__name__
    parser = ArgumentParser(prog=f"python -m {name}", description=module.HELP)
    module.configure_parser(parser)
    return module.run(parser.parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``rtcauth`` (setup.cfg); returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
