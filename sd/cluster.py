"""Batch renders on a Ray cluster: `render_batch()` sends a batch's jobs to a pool of Ray actors, each of which
loads the models once on its own device (its GPU, where it has one) and renders one job at a time; the images
come back to the caller, which writes each file atomically, so that workers need no shared file system.

Ray is the scheduler (its ActorPool) and the fault tolerance: a worker whose process dies or whose node is lost
is restarted by Ray, which runs its unfinished job again (`max_restarts`, `max_task_retries`). A job that fails
for its own reasons (an SDError, such as a size the model cannot render) is named at the end while the rest of
the batch completes. Seeds belong to jobs, never to workers, so a job makes the same image wherever it runs.

Ray is the optional extra sd[ray]: it is imported only when a batch runs. Every machine needs sd installed and the
checkpoint at the same path (the demo model is found in each machine's own copy of sd).
"""

import logging
import math
import os
import socket
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .files import hashes
from .batch import Job, save_png
from .errors import SDError, counted
from .pipeline import DEMO_CHECKPOINT, DEMO_NAME, cached_models, find_checkpoint, generate, pick_device
from .precision import weights_dtype
from .settings import Settings

log = logging.getLogger("sd")

INSTALL_HINT = 'pip install "sd[ray]"'
RETRIES = 2  # how many times a job runs again after its worker died while rendering it
CONNECT_TIMEOUT_S = 5  # Ray itself retries an unreachable address for minutes
# Test hooks: a worker's process exits, as a crash would, when it starts a job whose file's path holds this text:
# only the worker's first process (Ray's retry then succeeds), or every time (the job fails).
CRASH_ONCE, CRASH_ALWAYS = "SD_RAY_TEST_CRASH_ONCE", "SD_RAY_TEST_CRASH_ALWAYS"


class BatchFailed(SDError):
    """Jobs that failed for their own reasons, once the rest of the batch is done."""

    exit_code = 1

    def __init__(self, failures: list[tuple[Job, str]], total: int):
        self.failures = failures
        named = "; ".join(f"{job.path}: {reason}" for job, reason in failures)
        super().__init__(f"{len(failures)} of {total} images failed: {named}")


@dataclass
class Rendered:
    """What a worker sends back for a job: the image and the settings that made it, or why it failed."""

    job: Job
    image: Image.Image | None
    made: Settings | None
    error: str | None
    node: str | None  # the Ray node id of the worker
    after_restart: bool  # the first job of a restarted worker: the one it was rendering when it was lost


class Worker:
    """A Ray actor: renders jobs one at a time with the models loaded at its first job, on its own device.
    `vae`: a VAE file for the checkpoint's, or None; `inputs`: generate()'s options that every job shares (input
    image, mask, embeddings, VAE tiling, control images)."""

    def __init__(self, checkpoint: str, vae: str | None, device: str, dtype: str, inputs: dict):
        import ray

        context = ray.get_runtime_context()
        with warnings.catch_warnings():  # the property reads Ray's own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = context.was_current_actor_reconstructed
        self.node = context.get_node_id()
        self.checkpoint, self.vae, self.device, self.dtype, self.inputs = checkpoint, vae, device, dtype, inputs
        self.jobs_started = 0

    def render(self, job: Job) -> Rendered:
        self.jobs_started += 1
        hooks = [os.environ.get(CRASH_ALWAYS), None if self.restarted else os.environ.get(CRASH_ONCE)]
        if any(text and text in str(job.path) for text in hooks):
            os._exit(1)
        device = pick_device(self.device)
        # a checkpoint this machine cannot load is raised: it stops the batch, as it would stop every job
        models = cached_models(find_checkpoint(self.checkpoint), device, weights_dtype(self.dtype, device), self.vae)
        after_restart = self.restarted and self.jobs_started == 1
        try:
            image, = generate(job.settings, models=models, device=device, progress=False, **self.inputs)
        except SDError as error:
            return Rendered(job, None, None, str(error), self.node, after_restart)
        return Rendered(job, image, image.info["sd"], None, self.node, after_restart)


def render_batch(jobs: Iterable[Job], checkpoint: str | Path | None = None, *, vae: str | Path | None = None, ray_address: str | None = None,
                 workers: int | None = None, gpus_per_worker: float | None = None, cpus_per_worker: float = 1,
                 device: str = "auto", dtype: str = "auto", overwrite: bool = False, progress: bool = True,
                 **inputs) -> Iterator[Path]:
    """Renders each job's image on a Ray cluster and writes it to the job's path, yielding each path once its
    file is complete, in the order they finish; files that exist are skipped unless `overwrite`. Jobs that fail
    for their own reasons are named, once the others are done, by a BatchFailed (exit code 1).

    `ray_address`, as Ray's: None for $RAY_ADDRESS, else the cluster `ray start` joined this machine to, else a
    Ray started on this machine for the batch; "auto" the first two only; "HOST:PORT" a cluster's head node. A
    Ray connection the caller already has is used as it is. `workers`: default, as many as the cluster has room for, each taking `gpus_per_worker` GPUs
    (default: 1 where the cluster has GPUs, else 0) and `cpus_per_worker` CPUs. `device` and `dtype` are chosen
    by each worker on its own machine, as generate() does; `vae`, a VAE file for the checkpoint's (at the same
    path on each machine, as the checkpoint); `inputs` are generate()'s options shared by all jobs.

    Ray's absence, an unreachable address and a missing checkpoint are refused here, before the first job.
    """
    ray = import_ray()
    if not ray.is_initialized():
        check_reachable(ray_address or os.environ.get("RAY_ADDRESS"))
    jobs = [job for job in jobs if overwrite or not job.path.exists()]
    checkpoint = find_checkpoint(checkpoint)
    worker_args = (str(Path(vae).resolve()) if vae is not None else None, device, dtype, inputs)
    made_by = hashes.file_fields(checkpoint, vae) if jobs else {}
    return rendering(ray, jobs, checkpoint, made_by, ray_address, workers, gpus_per_worker, cpus_per_worker, worker_args, progress)


def rendering(ray, jobs: list[Job], checkpoint: Path, made_by: dict, ray_address: str | None, workers: int | None, gpus_per_worker: float | None,
              cpus_per_worker: float, worker_args: tuple, progress: bool) -> Iterator[Path]:
    """render_batch()'s work, once its arguments are checked. `made_by`: the Settings fields naming the files;
    `worker_args`: the VAE file, the device, the dtype and the inputs."""
    if not jobs:
        return
    # the demo model is found in each machine's own copy of sd; a checkpoint at the same path on each
    worker_checkpoint = DEMO_NAME if checkpoint.resolve() == DEMO_CHECKPOINT.resolve() else str(checkpoint.resolve())
    with connection(ray, ray_address):
        gpus = gpus_per_worker if gpus_per_worker is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
        count = worker_count(ray.cluster_resources(), workers, cpus_per_worker, gpus)
        worker = ray.remote(Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus, scheduling_strategy="SPREAD",
                                            max_restarts=-1, max_task_retries=RETRIES)
        actors = [worker.remote(worker_checkpoint, *worker_args) for _ in range(count)]
        try:
            yield from collect(ray, actors, jobs, made_by, progress)
        finally:  # done, failed or interrupted: the cluster's work stops with the command
            for actor in actors:
                ray.kill(actor)


def collect(ray, actors: list, jobs: list[Job], made_by: dict, progress: bool) -> Iterator[Path]:
    """Hands the jobs to the actors as they become free, and writes each image as it comes back."""
    from ray.util import ActorPool

    pool, in_flight = ActorPool(actors), {}  # actor id -> the actor and the job it renders (one at a time)

    def submit(actor, job: Job):
        in_flight[actor._actor_id.hex()] = actor, job  # the id Ray's errors name the actor by
        return actor.render.remote(job)

    for job in jobs:
        pool.submit(submit, job)
    failures, nodes = [], set()
    with tqdm(total=len(jobs), unit="image", disable=not progress) as bar:
        while pool.has_next():
            rendered = next_rendered(ray, pool, in_flight)
            if rendered.node is not None:
                nodes.add(rendered.node)
            bar.set_postfix_str(f"{len(nodes)} node{'s' * (len(nodes) > 1)}")
            bar.update()
            if rendered.after_restart:
                log.warning("a worker was lost; Ray restarted it and ran its job again: %s", rendered.job.path)
            if rendered.error is not None:
                log.warning("failed: %s: %s", rendered.job.path, rendered.error)
                failures.append((rendered.job, rendered.error))
                continue
            path = rendered.job.path
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(rendered.image, path, replace(rendered.made, **made_by).to_infotext())
            yield path
    if failures:
        raise BatchFailed(failures, len(jobs))


def next_rendered(ray, pool, in_flight: dict) -> Rendered:
    """The next job a worker finished, or failed: one whose worker died each of the 1 + RETRIES times it ran it.
    A worker that cannot load the models stops the batch."""
    try:
        return pool.get_next_unordered()
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, SDError):
            raise SDError(f"a worker failed: {error.cause}") from None
        raise
    except ray.exceptions.RayActorError as error:
        actor, job = in_flight[error.actor_id]
        if isinstance(error, ray.exceptions.ActorDiedError):  # which the pool drops, but Ray restarts
            pool.push(actor)
        return Rendered(job, None, None, f"its worker died each of the {1 + RETRIES} times it ran it", None, False)


def worker_count(resources: dict, workers: int | None, cpus: float, gpus: float) -> int:
    """`workers`, or as many as the cluster has room for; refuses more than that, which would wait forever."""
    needs = {"CPU": cpus, "GPU": gpus}
    for name, need in needs.items():
        if not 0 <= need < math.inf:
            raise SDError(f"each worker's {name}s must be a number of 0 or more, got {need}")
    room = min(int(resources.get(name, 0) // need) for name, need in needs.items() if need)
    count = room if workers is None else workers
    if not 1 <= count <= room:
        have = " and ".join(counted(resources.get(name, 0), name) for name in needs)
        each = " and ".join(counted(need, name) for name, need in needs.items())
        asked = f", not {workers}" if workers is not None else ""
        raise SDError(f"the Ray cluster has {have}: room for {counted(room, 'worker')} of {each} each{asked}; "
                      "give fewer --workers, fewer --cpus-per-worker or --gpus-per-worker, or add machines")
    return count


def import_ray():
    try:
        import ray
    except ImportError:
        raise SDError(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


@contextmanager
def connection(ray, address: str | None):
    """Connected to Ray for the batch: as the caller already is, else to `address` (see render_batch), and
    disconnected after (which stops a Ray started here)."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, log_to_driver=False)  # stdout is for the command's own lines; failures come back as errors
    except ConnectionError as error:
        raise SDError(f"cannot connect to Ray: {error}") from None
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str | None) -> None:
    """Refuses at once an address that is not HOST:PORT, or one nobody answers at, which Ray would retry for minutes."""
    if address in (None, "", "auto", "local"):
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not (host and colon and port.isdigit()):
        raise SDError(f"Ray address {address!r}: give the head node's HOST:PORT, which `ray start --head` prints, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise SDError(f"cannot reach a Ray cluster at {address} ({error.strerror or error}): start one there with "
                      "`ray start --head`, or give the address it printed") from None
