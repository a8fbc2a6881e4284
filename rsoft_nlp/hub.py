"""Reaching the Hugging Face Hub, and failing fast with the local alternative when it cannot be reached."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["HubUnreachableError", "hub_reachable", "require_hub"]


class HubUnreachableError(RuntimeError):
    """The Hub is needed for something that was not given locally, and it cannot be reached."""


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers a TCP connection within ``timeout`` seconds (False in offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, fix: str) -> None:
    """Raises :class:`HubUnreachableError` naming ``fix`` unless the Hub can be reached.

    Args:
        what: What was to be loaded, e.g. "GLUE task 'mrpc' (nyu-mll/glue)".
        fix: The local alternative, e.g. "pass --data-dir with a folder in the classic GLUE TSV layout".
    """
    if not hub_reachable():
        raise HubUnreachableError(
            f"cannot load {what}: the Hugging Face Hub is not reachable (offline). To run offline, {fix}"
        )
