"""``vitslim compress --cluster``: the candidates' builds and fidelity on Ray, timing on the
deploy CPU.

A candidate's build (apply the recipe, calibrate, export) and its fidelity evaluation do not
depend on the CPU they run on, so each is a Ray task, all of them at once. The FP32 model, the
calibration batch, the evaluation batches and the FP32 outputs on them go into the object
store once and every task reads them from there. Speed is a property of the deploy CPU: the
candidates are timed one at a time, in grid order (the same early-stopping decisions as in
process), only after every build is done (no build shares a CPU with a timing), on the
driver's machine or, with ``time_on``, on a node offering that custom resource.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch
from ray.exceptions import RayError, RayTaskError, TaskCancelledError
from torch import nn

from vitslim.bench import machine_info
from vitslim.cluster.connect import cluster_summary
from vitslim.compress.search import (
    CandidateResult,
    Evaluate,
    SearchInputs,
    build_and_measure,
    time_candidate,
)
from vitslim.errors import ConfigError
from vitslim.recipes import Recipe

if TYPE_CHECKING:
    from vitslim.artifact import Artifact

# A lost worker's candidate is run once more, then reported as failed with the reason.
BUILD_RETRIES = 1


def pack_folder(folder: Path) -> bytes:
    """The folder's files as an uncompressed tar (artifacts are already compact)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def unpack_folder(data: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(folder, filter="data")


@ray.remote(num_cpus=1)
def build_task(model: nn.Module, recipe: Recipe, key: str, calib: torch.Tensor, batches: list, reference,
               source, calibration: dict) -> tuple[CandidateResult, bytes | None]:
    """``build_and_measure`` on a worker: the result and the artifact's files (None if it failed)."""
    with tempfile.TemporaryDirectory(prefix="vitslim-candidate-") as tmp:
        result, artifact = build_and_measure(model, recipe, key, calib, batches, reference, Path(tmp), source,
                                             calibration)
        return result, (pack_folder(Path(tmp)) if artifact is not None else None)


@ray.remote(num_cpus=0)
def time_task(model: nn.Module, recipe: Recipe, packed: bytes, result: CandidateResult, batch_size: int,
              iters: int, needed: float | None, enough: float | None) -> CandidateResult:
    """``time_candidate`` on a timing node, with every CPU of that node (as in process)."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="vitslim-timing-") as tmp:
        unpack_folder(packed, Path(tmp))
        return time_candidate(model, recipe, artifact_to_time(recipe, Path(tmp)), result, batch_size, iters,
                              lambda _: needed, enough)


def artifact_to_time(recipe: Recipe, folder: Path) -> Artifact | None:
    """The artifact built for ``recipe`` in ``folder``, loaded; None for the original (no
    steps), which is timed as the FP32 model itself."""
    from vitslim.artifact import load
    from vitslim.deploy.artifact import artifact_name

    return load(folder / artifact_name(recipe)) if recipe.steps else None


@ray.remote(num_cpus=0)
def machine_task() -> dict:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return machine_info() | {"node": ray.util.get_node_ip_address()}


class RayEngine:
    """Runs ``compress``'s candidates on the connected Ray cluster (see the module docstring).
    ``time_on`` names a custom resource (e.g. ``vitslim_target``) whose nodes time the
    candidates; by default they are timed on the driver's machine."""

    def __init__(self, time_on: str | None = None) -> None:
        if not ray.is_initialized():
            raise ConfigError("RayEngine needs a connected Ray: use it inside vitslim.cluster.ray_session(ADDRESS)")
        if time_on is not None and not any(n.get("Alive") and n.get("Resources", {}).get(time_on)
                                           for n in ray.nodes()):
            raise ConfigError(f"--time-on {time_on!r}: no node of the cluster offers that resource; start the deploy "
                              f"node with ray start --resources '{{\"{time_on}\": 1}}' or leave --time-on out")
        self.time_on = time_on
        self.not_to_cache: set[str] = set()  # candidates whose worker was lost: rerun next time

    def start(self, inputs: SearchInputs, pending: list[tuple[Recipe, str]]) -> Evaluate:
        """Submit every pending candidate's build at once; return the function that waits for
        a candidate's build and times it."""
        shared = [ray.put(x) for x in (inputs.model, inputs.calib, list(inputs.eval_loader), inputs.reference)]
        builds = {key: build_task.options(max_retries=BUILD_RETRIES, name=f"vitslim build {recipe.name}").remote(
            shared[0], recipe, key, *shared[1:], inputs.source, inputs.calibration) for recipe, key in pending}
        model_ref = shared[0]

        def evaluate(recipe: Recipe, key: str, needed: Callable[[CandidateResult], float | None],
                     enough: float | None) -> CandidateResult:
            _wait_all(list(builds.values()))  # nothing is timed while a build may share its CPU
            try:
                result, packed = _get(builds[key])
            except TaskCancelledError:
                raise
            except RayError as err:  # on Ray's side, not the candidate's: reported, not cached
                self.not_to_cache.add(key)
                return _failed(recipe, key, err)
            if packed is None:
                return result
            staged = inputs.staging / key
            unpack_folder(packed, staged)  # where compress saves the chosen artifact from
            if self.time_on:
                task = time_task.options(resources={self.time_on: 1}, name=f"vitslim timing {recipe.name}")
                return _get(task.remote(model_ref, recipe, packed, result, inputs.batch_size, inputs.iters,
                                        needed(result), enough))
            return time_candidate(inputs.model, recipe, artifact_to_time(recipe, staged), result, inputs.batch_size,
                                  inputs.iters, needed, enough)

        return evaluate

    def timing_machine(self) -> dict:
        """The timing CPU's description (a node offering ``time_on``, or this machine), with
        the cluster that built the candidates."""
        if self.time_on:
            machine = _get(machine_task.options(resources={self.time_on: 1}).remote())
            timed_on = f"the Ray node at {machine.pop('node')} offering {self.time_on!r}"
        else:
            machine, timed_on = machine_info(), "the driver's machine"
        return machine | {"engine": cluster_summary(), "timed_on": timed_on}


def _get(ref: ray.ObjectRef):
    """``ray.get``; Ctrl-C cancels the task."""
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise


def _wait_all(refs: list[ray.ObjectRef]) -> None:
    """Wait until every task has ended (done or failed); Ctrl-C cancels those still running."""
    try:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def _failed(recipe: Recipe, key: str, err: RayError) -> CandidateResult:
    """A candidate whose task failed on Ray's side (its worker or node lost twice, or its
    inputs or outputs lost), with the reason."""
    tries = BUILD_RETRIES + 1
    what = "failed on its Ray worker" if isinstance(err, RayTaskError) else f"lost its Ray worker {tries} times"
    reason = " ".join(str(err).split())[:300]
    return CandidateResult(recipe=recipe.to_dict(), key=key, error=f"{what} ({type(err).__name__}: {reason})")
