"""Connecting to a Ray cluster, or starting a local one, from a ``--cluster ADDRESS``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from vitslim.errors import ConfigError

# A local Ray's shared-memory object store: the model, calibration and evaluation tensors of a
# ViT-B search take a few hundred MB; the cap keeps Ray from reserving 30 % of the machine's memory.
LOCAL_OBJECT_STORE_BYTES = 2 << 30
ADDRESS_FORMS = "'auto' (the running cluster), 'ray://HOST:PORT' (Ray Client), 'HOST:PORT' or 'local:N'"


def parse_address(address: str) -> tuple[str, str | int]:
    """``('local', N)`` for ``local:N``, else ``('connect', address)``; anything else is an error."""
    text = address.strip()
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--cluster {address!r}: local:N takes a whole number of workers N >= 1, e.g. local:2")
        return "local", int(count)
    if text == "auto" or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", text):
        return "connect", text
    raise ConfigError(f"--cluster {address!r} is not understood; give {ADDRESS_FORMS}")


@contextmanager
def ray_session(address: str) -> Iterator[None]:
    """Ray connected for the ``with`` block: to the cluster at ``address``, or a local Ray with
    N one-CPU workers on the loopback for ``local:N`` (shut down at the end). An already
    initialised Ray (``ray.init`` called by the user) is used as it is and left running."""
    kind, value = parse_address(address)
    if ray.is_initialized():
        yield
        return
    try:
        if kind == "local":
            _keep_on_loopback()
            ray.init(address="local", num_cpus=value, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=value, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r} ({' '.join(str(err).split())[:200]}); "
                          "start one (ray start --head) or use --cluster local:N") from None
    try:
        yield
    finally:
        ray.shutdown()


def _keep_on_loopback() -> None:
    """A local Ray is one machine: keep its services on 127.0.0.1. (Ray resolves 127.0.0.1 to
    the machine's outward address unless clusters are off, a flag read from ray_constants.)"""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def cluster_summary() -> str:
    """One line naming the cluster: nodes and CPUs."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    return f"Ray {ray.__version__}, {len(nodes)} node{'s' * (len(nodes) != 1)}, {cpus:g} CPUs"
