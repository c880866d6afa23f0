"""Batch image classification, exactly once, with checkpoints on two local disks and S3, through a crash.

    python examples/classify_images.py [--images 20000] [--batch 64] [--out DIR] [--short]

A small CNN with random (seeded) weights labels synthetic 3x32x32 images (each one a seeded function
of its id: a coloured grating plus noise) and writes ``(id, label, confidence)`` rows to a parquet
`resilient.io.FileSink` under ``DIR/predictions``. The pipeline is stateless (a class whose
``__init__`` builds the model once per worker actor); the job's records (epoch claims, progress) go
to three checkpoint replicas: ``DIR/ckpt-a``, ``DIR/ckpt-b`` and an S3 URL, with a write quorum of
two. A third of the way through, one worker actor process is SIGKILLed by PID; its in-flight batches
are redelivered to a replacement. The script then checks that every image id has exactly one
prediction and that every label equals the one a failure-free, in-process run of the same model gives.
It exits 0 when both hold, 1 when one does not, 2 when the job ended before the crash was injected.

Where the S3 replica is (environment variables read, all optional):

* ``RESILIENT_STORAGE``: if it lists ``s3://`` URLs, they are the S3 replicas (its other entries are
  not used: the two local replicas are always under ``DIR``).
* ``RESILIENT_STORAGE_OPTIONS``: fsspec/s3fs options for them, e.g.
  ``{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}``.
* credentials come from the usual AWS chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``...), never from these variables.

Settings travel to the worker actors without their secrets: each actor reads credentials from its
own environment (see `resilient.config`), so they must be set where Ray starts its workers (a Ray
started by this script inherits the script's environment).

With no ``s3://`` URL there, the script starts its own moto S3 server on 127.0.0.1
(`resilient.testing.S3Server`, in the ``dev`` extra) and stops it at the end. That throwaway bucket is
opened to unsigned requests by a bucket policy, so no credential has to reach the workers, whatever
environment the running Ray has. Without moto the script falls back to a third local directory and
says so. Each run uses a fresh job id, so a shared S3 prefix can serve many runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

import resilient
from resilient.testing import kill_worker
from resilient.config import redact_url
from resilient.errors import ConfigError

__all__ = ["Classifier", "allow_unsigned", "main", "make_images", "unsigned_options"]

SEED = 0
CLASSES = 10
BUCKET = "resilient-examples"


def make_images(ids: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Synthetic images, ``(len(ids), 3, 32, 32)`` float32: image ``i`` depends on ``i`` alone (a grating
    with a seeded frequency, angle, phase and colour, plus seeded noise)."""
    out = torch.empty(len(ids), 3, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for row, i in enumerate(ids):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + int(i))
        freq, angle, phase = torch.rand(3, generator=g) * torch.tensor([0.6, 3.1416, 6.2832])
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        wave = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * freq + phase)
        out[row] = colour * wave + 0.3 * torch.randn(3, 32, 32, generator=g)
    return out


class Classifier:
    """One model per worker actor; each batch of ids becomes ``{"id", "label", "confidence"}`` columns."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(SEED)
        self.model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, CLASSES),
        ).eval()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], dtype=np.int64)
        with torch.no_grad():
            probs = torch.softmax(self.model(make_images(ids)), dim=1)
        confidence, label = probs.max(dim=1)
        return {"id": ids, "label": label.numpy().astype(np.int64), "confidence": confidence.numpy()}


#: The resilient job: stateless, two worker actors at a quarter CPU each, no spare actor built ahead.
classify = resilient.pipeline(Classifier, num_actors=2, actor_cpus=0.25, standby=0)


@contextlib.contextmanager
def s3_replicas(environ: Mapping[str, str], say: Any) -> Iterator[tuple[list[str], dict[str, Any] | None]]:
    """``(s3_urls, storage_options)`` for the S3 replicas: from the environment if it names any (options
    None: `resilient.Settings` reads ``RESILIENT_STORAGE_OPTIONS`` itself), else a moto server of our own
    (stopped on exit), else none."""
    urls = [u.strip() for u in environ.get("RESILIENT_STORAGE", "").split(",") if u.strip().startswith("s3://")]
    if urls:
        say(f"S3 replica(s) from RESILIENT_STORAGE: {', '.join(redact_url(u) for u in urls)}")
        yield urls, None
        return
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        say("no s3:// URL in RESILIENT_STORAGE and moto/s3fs are not installed: using a third local "
            "directory instead of S3 (pip install -e '.[dev]' for the local S3 server)")
        yield [], None
        return
    from resilient.testing import S3Server

    with S3Server() as server:
        url = server.create_bucket(BUCKET) + "/classify-images"
        allow_unsigned(server.filesystem(), BUCKET)
        say(f"no s3:// URL in RESILIENT_STORAGE: started a local moto S3 server at {server.endpoint_url}")
        yield [url], {"s3": unsigned_options(server.storage_options)}


def allow_unsigned(fs: Any, bucket: str) -> None:
    """Give unsigned (anonymous) requests every S3 action on `bucket`, with a bucket policy written
    through `fs` (an ``s3fs.S3FileSystem`` holding the bucket owner's credentials). For a throwaway local
    server only."""
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
    }]}
    fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(policy))


def unsigned_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """s3fs options sending unsigned requests: `options` without credentials, plus ``anon=True``."""
    return {**{k: v for k, v in options.items() if k not in ("key", "secret", "token")}, "anon": True}


def reference_labels(ids: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidences of a failure-free, in-process run over the same batches (one thread, as
    in the actors)."""
    threads = torch.get_num_threads()
    try:
        model = Classifier()
        labels, conf = [], []
        for lo in range(0, len(ids), batch):
            out = model({"id": ids[lo:lo + batch]})
            labels.append(out["label"])
            conf.append(out["confidence"])
        return np.concatenate(labels), np.concatenate(conf)
    finally:
        torch.set_num_threads(threads)


def kill_one_worker(handle: resilient.JobHandle, after: int, say: Any) -> bool:
    """SIGKILL one worker actor process by PID once `after` batches are committed; False if the job ended
    first."""
    victim = kill_worker(handle, after=after)
    if victim is None:
        return False
    say(f"killed worker pid {victim['pid']} (slot {victim['slot']}) after {handle.progress()['committed']} "
        "committed batches")
    return True


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the example; return 0 when every guarantee held (see the module docstring).

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
        environ: where the S3 replica and ``RESILIENT_*`` settings are read (``os.environ`` when None).
    """
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000, help="images to classify")
    ap.add_argument("--batch", type=int, default=64, help="images per batch")
    ap.add_argument("--out", default=None, help="a new or empty directory for outputs and local replicas")
    ap.add_argument("--short", action="store_true", help="a small, fast run (2,048 images, batches of 32)")
    args = ap.parse_args(argv)
    if args.short:
        args.images, args.batch = 2048, 32
    environ = os.environ if environ is None else environ
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="resilient-classify-"))
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError("--out", out, "a new or empty directory (this one holds an earlier run)")
    say = print

    import ray

    owns_ray = not ray.is_initialized()
    try:
        with s3_replicas(environ, say) as (s3_urls, s3_options):
            local = [os.path.join(out, "ckpt-a"), os.path.join(out, "ckpt-b")]
            storage = local + (s3_urls or [os.path.join(out, "ckpt-c")])
            extra = {} if s3_options is None else {"storage_options": s3_options}
            settings = resilient.Settings.from_env(environ, storage=storage, write_quorum="majority", **extra)
            job_id = f"classify-images-{uuid.uuid4().hex[:8]}"
            sink = resilient.io.FileSink(os.path.join(out, "predictions"), format="parquet")
            source = resilient.io.RangeSource(args.images, args.batch)
            say(f"job {job_id}: {args.images} images in {len(source)} batches; replicas "
                f"{', '.join(redact_url(u) for u in settings.storage)}")
            handle = classify.run(source, sink, job_id=job_id, settings=settings)
            killed = kill_one_worker(handle, len(source) // 3, say)
            result = handle.wait()
            with resilient.CheckpointStore(settings) as store:
                progress = store.latest(f"{job_id}/progress")
    finally:
        if owns_ray:
            ray.shutdown()

    ids, labels, conf = [], [], []
    for _, cols in sink.read_all():
        ids.append(cols["id"])
        labels.append(cols["label"])
        conf.append(cols["confidence"])
    ids_a, labels_a, conf_a = (np.concatenate(x) if x else np.empty(0) for x in (ids, labels, conf))
    counts = collections.Counter(ids_a.tolist())
    exactly_once = sorted(counts) == list(range(args.images)) and set(counts.values()) == {1}
    want_labels, want_conf = reference_labels(np.arange(args.images), args.batch)
    order = np.argsort(ids_a, kind="stable")
    same_labels = exactly_once and np.array_equal(labels_a[order], want_labels)
    same_conf = exactly_once and np.allclose(conf_a[order], want_conf, rtol=0, atol=1e-6)
    spread = np.bincount(want_labels, minlength=CLASSES).tolist()
    say(f"batches {result.committed}/{result.total}, restarts {result.restarts}, dead letters "
        f"{len(result.dead_letters)}; progress record generation {progress} on the checkpoint replicas")
    say(f"every image id exactly once: {exactly_once}; labels equal to a failure-free run: {same_labels} "
        f"(confidences within 1e-6: {same_conf}); label counts {spread}")
    say(f"predictions: {sink.url}")
    if not killed:
        say("the job finished before a worker could be killed: run more --images")
        return 2
    return 0 if exactly_once and same_labels and same_conf and result.restarts >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
