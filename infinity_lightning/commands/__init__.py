"""Subcommands of the ``infinity-lightning`` command."""
