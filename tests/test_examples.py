"""The examples' short runs, in-process on the session's Ray: each kills a worker by PID mid-run and must
return 0; its committed outputs are then read back from the sink and counted here, independently.

Ray workers import the example modules as ``examples.<name>`` through the PYTHONPATH that
``ray_session`` sets (the repository root).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

import resilient
from examples import classify_images, generate_text, streaming_anomaly
from resilient.io import FileSink

pytestmark = pytest.mark.usefixtures("ray_session")


def counted(ids) -> collections.Counter:
    return collections.Counter(ids)


def check_classified(out, images: int = 2048) -> None:
    ids, labels, conf = [], [], []
    for _, cols in FileSink(str(out / "predictions"), format="parquet").read_all():
        ids.extend(cols["id"].tolist())
        labels.extend(cols["label"].tolist())
        conf.extend(cols["confidence"].tolist())
    assert counted(ids) == counted(range(images))
    assert set(labels) <= set(range(classify_images.CLASSES)) and len(set(labels)) > 1
    assert all(1 / classify_images.CLASSES <= c <= 1 for c in conf)


def test_classify_images_with_s3_from_environment(tmp_path, s3_server, s3_bucket):
    # The session's Ray workers started before this test: no credential set now can reach them, so the
    # bucket takes unsigned requests and the options carry none.
    bucket = s3_bucket.url[len("s3://"):]
    classify_images.allow_unsigned(s3_server.filesystem(), bucket)
    environ = {
        "RESILIENT_STORAGE": f"{s3_bucket.url}/ckpt",
        "RESILIENT_STORAGE_OPTIONS": json.dumps({"s3": classify_images.unsigned_options(s3_bucket.storage_options)}),
    }
    assert classify_images.main(["--short", "--out", str(tmp_path / "run")], environ=environ) == 0
    check_classified(tmp_path / "run")
    s3_only = resilient.Settings.from_env(environ, storage=[f"{s3_bucket.url}/ckpt"])
    with resilient.CheckpointStore(s3_only) as store:
        keys = store.keys()
    # the job's records went to the S3 replica too: its progress and every slot's epoch claims
    assert any(k.startswith("classify-images-") and k.endswith("/progress") for k in keys), keys


def test_classify_images_with_its_own_s3_server(tmp_path, capsys):
    assert classify_images.main(["--short", "--out", str(tmp_path / "run")], environ={}) == 0
    check_classified(tmp_path / "run")
    printed = capsys.readouterr().out
    assert "started a local moto S3 server" in printed and "s3://resilient-examples/classify-images" in printed


def test_streaming_anomaly(tmp_path):
    out = tmp_path / "run"
    assert streaming_anomaly.main(["--short", "--out", str(out)], environ={}) == 0
    sensors, steps = 8, 6000
    readings, flags = collections.Counter(), 0
    for _, cols in FileSink(str(out / "readings"), format="jsonl").read_all():
        readings.update(zip(cols["sensor"], cols["t"]))
        assert cols["anomaly"] == [abs(z) > 5.0 for z in cols["z"]]
        flags += sum(cols["anomaly"])
    assert readings == counted((s, t) for s in range(sensors) for t in range(steps))
    settings = resilient.Settings.from_env({}, storage=[str(out / "ckpt-a"), str(out / "ckpt-b")])
    with resilient.CheckpointStore(settings) as store:
        final = [store.load(f"sensor-anomalies/slot-{s}").state["user"] for s in range(streaming_anomaly.SLOTS)]
    # each sensor lives in one slot: the slots' final states saw every reading once, flagged every flag
    assert np.array_equal(sum(f["seen"] for f in final), np.full(sensors, steps))
    assert int(sum(f["flagged"] for f in final).sum()) == flags > 0


def test_generate_text(tmp_path, capsys):
    out = tmp_path / "run"
    assert generate_text.main(["--short", "--out", str(out)], environ={}) == 0
    sequences, chunks, tokens = 4, 16, 16
    seen = collections.Counter()
    for b, o in FileSink(str(out / "tokens"), format="tensors").read_all():
        seen[(o["seq"], o["chunk"])] += 1
        assert (o["seq"], o["chunk"]) == (b % sequences, b // sequences)
        assert o["tokens"].shape == (tokens,) and int(o["tokens"].min()) >= 0
        assert int(o["tokens"].max()) < generate_text.VOCAB
    assert seen == counted((q, c) for q in range(sequences) for c in range(chunks))
    assert "resumed mid-sequence: True" in capsys.readouterr().out
