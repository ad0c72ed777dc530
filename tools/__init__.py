"""The subcommands that are not a part: generate, convert, gap, sweep (main.py dispatches to them)."""
