"""The ``qra`` command: the subcommands listed in ``COMMANDS``, each a module of ``planner.commands``.

Any ``QRAError`` (bad config, plan, path) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

#: the modules of the ``planner`` extra (pyproject.toml); ``pip install qra`` alone is the runtime (qra_plugin)
PLANNER_EXTRA = (
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "typer",
    "rich",
    "numpy",
    "scipy",
    "matplotlib",
    "botorch",
    "gpytorch",
    "hyperopt",
    "gguf",
)


def missing_planner_modules() -> list[str]:
    """The planner extra's modules that are not installed (found without importing them)."""
    return [name for name in PLANNER_EXTRA if importlib.util.find_spec(name) is None]


def _exit_without_planner_extra() -> None:
    """Many planner imports sit in function bodies: check up front, so a light install fails in one line."""
    missing = missing_planner_modules()
    if missing:
        print(
            f"qra: error: the planner's dependencies are not installed ({', '.join(missing)}): "
            'pip install "qra[planner]"',
            file=sys.stderr,
        )
        sys.exit(2)


_exit_without_planner_extra()  # before typer and the commands are imported

import typer  # noqa: E402

from qra_plugin.errors import QRAError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="qra: joint per-layer bits + LoRA rank planning")


@app.callback()
def _root() -> None:
    """qra: profile a model, search per-layer (bits, rank) under a memory budget, apply the plan."""


#: every subcommand, in the order ``qra --help`` lists them; each module has a ``register(app)``
COMMANDS = ("demo_model", "export_data", "profile", "search", "baseline", "estimate")


def _register_commands() -> None:
    for name in COMMANDS:
        importlib.import_module(f"planner.commands.{name}").register(app)


_register_commands()


def main() -> None:
    from planner.quiet import quiet_libraries

    quiet_libraries()
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
