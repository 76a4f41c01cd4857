"""Ray as an optional engine (``pip install 'vitslim[ray]'``): ``vitslim compress``, ``eval``
and ``sweep`` with ``--cluster ADDRESS`` run their independent work as Ray tasks and actors.

Without Ray installed nothing imports it: this package is imported only when a cluster is
asked for, and then says in one line how to install what is missing.

- ``ray_session(address)``: connect to a cluster (``auto``, ``ray://host:port``, ``host:port``)
  or start a local one (``local:N``) for the duration of a ``with`` block.
- ``RayEngine``: a ``compress`` engine: each candidate's build, calibration and fidelity
  evaluation is a Ray task; timing runs only on the deploy CPU (the driver's machine, or a
  node offering a custom resource), one candidate at a time, after the builds are done.
- ``evaluate_on_cluster``: ``vitslim eval`` with Ray Data reading and preprocessing the
  images in shards and an actor pool running the model; metrics reduced from sums.
"""

from vitslim.errors import ConfigError

try:
    import ray  # noqa: F401
except ImportError:
    raise ConfigError("--cluster needs Ray, which is not installed: pip install 'vitslim[ray]'") from None

from vitslim.cluster.compress import RayEngine
from vitslim.cluster.connect import ray_session
from vitslim.cluster.evaluate import evaluate_on_cluster

__all__ = ["RayEngine", "evaluate_on_cluster", "ray_session"]
