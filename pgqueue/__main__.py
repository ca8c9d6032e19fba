"""``python -m pgqueue`` runs the CLI."""

from pgqueue.cli import run

run()
