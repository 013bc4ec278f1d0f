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


def install_hint(extra: str) -> str:
    """The pip command that installs an optional extra's packages. Named package by package
    (read from this install's metadata), so it works however edgellama itself was installed:
    from a clone, a wheel or a folder."""
    try:
        from importlib.metadata import PackageNotFoundError, requires
    except ImportError:  # pragma: no cover
        return f"pip install 'edgellama[{extra}]'"
    try:
        lines = requires("edgellama") or []
    except PackageNotFoundError:
        lines = []
    marker = f'extra == "{extra}"'
    specs = []
    for line in lines:
        if marker in line.replace("'", '"'):
            spec = line.split(";", 1)[0].strip()
            if spec.startswith("edgellama["):  # an extra built on another: its packages
                inner = spec[len("edgellama["):-1]
                specs += [s for e in inner.split(",") for s in _extra_specs(lines, e.strip())]
            else:
                specs.append(spec)
    if not specs:
        return f"pip install 'edgellama[{extra}]'"
    return "pip install " + " ".join(f"'{s}'" for s in dict.fromkeys(specs))


def _extra_specs(lines: list[str], extra: str) -> list[str]:
    marker = f'extra == "{extra}"'
    return [line.split(";", 1)[0].strip() for line in lines if marker in line.replace("'", '"')]
