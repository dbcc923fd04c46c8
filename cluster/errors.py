"""The one exception type that reaches the user as a one-line message.

Every check on user input (files, flags, model directories, cluster resources) raises
`UserError` with a message that says what is wrong, the offending value, and what to do.
The CLI prints it as ``neuroscan: error: <message>`` and exits non-zero, with no traceback.
Anything else that escapes is a bug and keeps its traceback. The module is a leaf so that
every package (prompts, workers, aggregator) can raise it without importing the driver.
"""


class UserError(Exception):
    """Bad input, fixable by the user; the message is shown as one line."""
