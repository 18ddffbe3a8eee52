"""Errors a user can act on: the CLI prints their message and exits with status 2.

Every such error is a :class:`BookgenError`; the subclasses say where the mistake is (the experiment, the
corpus, the token store) and keep the builtin base they had, so existing ``except ValueError`` still works.
"""


class BookgenError(RuntimeError):
    """A run cannot continue; the message says what to change (file, key or flag)."""


class ConfigError(BookgenError, ValueError):
    """An experiment file (or an override) is invalid; the message names the file and the key."""


class CorpusError(BookgenError, ValueError):
    """The corpus file is malformed; the message names the file and line."""


class StoreError(BookgenError):
    """A token store is missing, incomplete or corrupted."""
