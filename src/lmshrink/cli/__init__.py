"""Command-line interface: ``lmshrink eval|info|quantize|prune|train|distill|run|report|compare|sensitivity``.

User errors (:class:`lmshrink.errors.LmshrinkError`) print one line ``error: ...`` and exit with status 2, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

from rich.markup import escape

from lmshrink.cli.app import app, err_console
from lmshrink.errors import LmshrinkError

#: Command modules; each registers its commands on :data:`lmshrink.cli.app.app` when imported.
COMMAND_MODULES = ("evaluate", "quantize", "prune", "distill", "pipeline")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        full = f"lmshrink.cli.{name}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lmshrink`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except LmshrinkError as exc:
        # the message is user-facing text, not rich markup: "pip install 'lmshrink[hub]'" must print as written
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:  # typer/click usage errors and --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
