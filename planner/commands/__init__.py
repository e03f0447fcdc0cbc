"""CLI subcommands: each module defines ``register(app)`` and is picked up by ``planner.cli``."""
