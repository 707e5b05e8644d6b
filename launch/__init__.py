"""Command-line entrypoints (`python -m launch.<name>`)."""
