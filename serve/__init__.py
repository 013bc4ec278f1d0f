"""`edgellama serve`: an OpenAI-compatible HTTP server over one model folder.

Needs the optional extra (`pip install 'edgellama[serve]'`: Starlette and uvicorn); the
runtime never imports this package.
"""

from __future__ import annotations

from edgellama.runtime.errors import EdgeLlamaError


class ServeError(EdgeLlamaError):
    """The server cannot start: the serve extra is missing, or the address is unusable."""


def require_extra() -> None:
    """Raise ServeError, naming the install command, if Starlette or uvicorn is missing."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServeError(f"serve needs {' and '.join(missing)}: pip install 'edgellama[serve]'")
