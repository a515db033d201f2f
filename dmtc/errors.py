"""User-facing errors.

Everything a user can get wrong (a missing data root, a missing split list, a corrupt image, a checkpoint
for another class count, ...) raises :class:`DMTCError` with one message that names the file or config key
and says how to fix it. The entry points print that message alone, without a traceback.
"""


class DMTCError(Exception):
    """A mistake in the user's inputs or configuration; the message says what and how to fix it."""
