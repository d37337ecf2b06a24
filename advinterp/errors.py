"""The one exception a user sees: a mistake they can fix, told in one line."""


class UserError(Exception):
    """Bad input (missing data, unknown name, corrupt file, bad ε).

    The CLI prints ``advinterp: error: <message>`` and exits with status 2;
    the message names the fix.
    """
