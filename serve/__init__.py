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
        from edgellama.runtime.errors import install_hint

        raise ServeError(f"serve needs {' and '.join(missing)}, which this install lacks: {install_hint('serve')}")


def check_api_key(api_key: str) -> None:
    """Raise ServeError unless the key fits in a header as sent: printable ASCII, no spaces, not empty."""
    if not isinstance(api_key, str) or not api_key or not all("!" <= c <= "~" for c in api_key):
        raise ServeError("the API key must be a non-empty string of printable ASCII characters without spaces")


def default_model_id(path) -> str:
    """The name a model is served under when none is given: a bundle file's stem
    (`smollm2.edgellama` -> `smollm2`), a folder's name (`models/smollm2-135m/` -> `smollm2-135m`)."""
    import os
    from pathlib import Path

    from edgellama.runtime.bundle import is_bundle

    path = Path(os.path.abspath(path))  # "." and ".." name the folder they stand for
    return (path.stem if is_bundle(path) else path.name) or "model"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x.y.z);
    False for wildcards (0.0.0.0, ::, ""), any other address and any other host name."""
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: it may resolve to anything
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A one-line warning when the server listens beyond this machine without an API key."""
    if api_key or is_loopback(host):
        return None
    shown = host if host else '""'
    return (f"warning: serving on {shown} without --api-key: anyone who can reach this port can use the model; "
            "set --api-key or EDGELLAMA_API_KEY")
