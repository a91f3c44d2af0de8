"""Command line: `mistral7b COMMAND ...` (see main.py)."""
