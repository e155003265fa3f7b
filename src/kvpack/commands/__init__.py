"""Subcommands of the ``kvpack`` CLI (see :mod:`kvpack.cli`)."""
