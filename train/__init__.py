"""Command-line entry points: `python -m train` trains, see train/__main__.py."""
