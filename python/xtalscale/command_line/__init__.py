"""DIALS import path ``dials.command_line``: the programs' parameter scopes for scripts."""
