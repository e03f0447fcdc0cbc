"""The ``qra`` command. Every module in ``planner.commands`` registers its own subcommands.

Any ``QRAError`` (bad config, plan, path) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import typer

from qra_plugin.errors import QRAError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="qra: joint per-layer bits + LoRA rank planning")


@app.callback()
def _root() -> None:
    """qra: profile a model, search per-layer (bits, rank) under a memory budget, apply the plan."""


def _register_commands() -> None:
    import planner.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"planner.commands.{info.name}")
        module.register(app)


_register_commands()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app(standalone_mode=False)
    except QRAError as exc:
        print(f"qra: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("qra: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
