"""``python -m circuitfind`` runs the command line (see :mod:`circuitfind.cli`)."""

from circuitfind.cli import main

main()
