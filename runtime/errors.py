"""User-facing failure families. The CLI prints ``str(err)`` as one line and exits non-zero.

Each message names the file or value at fault and says what to do. Anything else
escaping to the CLI is a bug and gets a traceback.
"""


class EdgeLlamaError(Exception):
    """Base of every error a user can cause and fix."""

    exit_code = 1


class BadModelFileError(EdgeLlamaError):
    """A weight, config, tokenizer or graph file is missing, truncated or malformed."""


class UnsupportedModelError(EdgeLlamaError):
    """A well-formed model this tool cannot handle (architecture, tensor type, ...)."""


class BadArgumentError(EdgeLlamaError):
    """An option or argument value is invalid."""

    exit_code = 2


class ContextOverflowError(EdgeLlamaError):
    """The prompt plus requested tokens do not fit the model's context."""


class OutputExistsError(EdgeLlamaError):
    """The output location exists and --force was not given."""


class OutputWriteError(EdgeLlamaError):
    """Writing the output failed part way (a full disk, a quota, a file-size limit); nothing was kept."""


class MissingExtraError(EdgeLlamaError):
    """The command needs packages of an optional extra that is not installed."""
