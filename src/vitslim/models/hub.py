"""The model hub, when it cannot be reached: offline mode before the first request.

The hub client retries an unreachable host with back-off for over a minute per file; one
connection attempt of a few seconds tells the same, and the hub's offline mode then answers
from the local cache (or fails) at once.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from urllib.parse import urlparse

PROBE_SECONDS = 2.0


def hub_address() -> tuple[str, int]:
    """(host, port) a hub request connects to first: the HTTPS proxy if one applies, else the
    hub's endpoint (``HF_ENDPOINT`` if set)."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to :func:`hub_address` opens within ``timeout`` seconds
    (name resolution included: it runs in a thread so a stalled resolver cannot hold it)."""
    finished, opened = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection(hub_address(), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
        finally:
            finished.set()

    threading.Thread(target=connect, daemon=True).start()
    finished.wait(timeout)
    return bool(opened)


def go_offline_if_unreachable() -> bool:
    """Switch the hub client to offline mode (cached files only) unless the hub answers; True
    when offline (also when the user set ``HF_HUB_OFFLINE`` already)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by libraries imported later, and by subprocesses
        constants.HF_HUB_OFFLINE = True
    return constants.HF_HUB_OFFLINE
