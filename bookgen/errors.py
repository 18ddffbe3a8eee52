"""Errors a user can act on: the CLI prints their message and exits with status 2."""


class BookgenError(RuntimeError):
    """A run cannot continue; the message says what to change (file, key or flag)."""
