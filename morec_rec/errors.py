"""The one exception type that the command line turns into a one-line message."""


class MorecError(ValueError):
    """An expected failure caused by the user's input (a file, a field, a value, a setting).

    The message is one line that names the file, field or value at fault; ``morec-rec``
    prints it without a traceback and exits with status 2.
    """
