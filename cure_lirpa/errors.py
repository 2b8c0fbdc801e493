"""The one exception type for mistakes a user can fix; the CLI turns it into a clean message."""


class UserError(ValueError):
    """Bad input (a path, a threat string, a checkpoint, a shape) with a message that says the fix."""
