"""Errors shown to users as a single line naming the cause and the remedy."""


class UserError(Exception):
    """A failure caused by the user's input or environment (bad path, bad option, bad data)."""
