"""Signed manifests (HMAC-SHA256) and credentials that never leak: real dirs, a real S3 server, real Ray.

Every secret here is a distinctive canary, so finding it anywhere (pickles, manifests, logs, errors,
reprs) is a failure; each absence check has a control showing the canary is found where it really is.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import resilient
from resilient.config import Settings, signing_key_ids
from resilient.errors import (
    ConfigError,
    CorruptionError,
    NoCheckpointError,
    PermanentStorageError,
    QuorumError,
    SignatureError,
    TransientStorageError,
)
from resilient.io.sinks import FileSink
from resilient.storage import CheckpointStore, layout
from resilient.storage.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
HEAD = struct.Struct("<8sI8s")
KEY_A = "key-A-" + "a1" * 16
KEY_B = "key-B-" + "b2" * 16
FAST = {"retry_attempts": 1, "retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.02}


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(32, 16, generator=g), "step": step, "name": f"run-{step}"}


def store_of(dirs: list[Path], **kw: Any) -> CheckpointStore:
    return CheckpointStore(Settings.from_env({}, storage=[str(d) for d in dirs], **{**FAST, **kw}))


def manifest_path(root: Path, key: str, g: int) -> Path:
    return root.joinpath(*layout.gen_dir(key, g).split("/"), layout.MANIFEST)


def data_path(root: Path, key: str, g: int) -> Path:
    d = manifest_path(root, key, g).parent
    (name,) = [n for n in os.listdir(d) if n.endswith(".data")]
    return d / name


def rewrite(data: bytes, mutate: Any) -> bytes:
    """The manifest with its JSON changed by `mutate`, re-encoded with a correct header and checksum, and
    whatever followed the JSON (the signature) kept as it was."""
    magic, n, _ = HEAD.unpack_from(data)
    body, trailer = data[HEAD.size : HEAD.size + n], data[HEAD.size + n :]
    doc = json.loads(body)
    mutate(doc)
    new = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return HEAD.pack(magic, len(new), xxhash.xxh3_64_digest(new)) + new + trailer


def strip_signature(data: bytes) -> bytes:
    magic, n, digest = HEAD.unpack_from(data)
    assert magic == b"RSLMANS1"
    return HEAD.pack(b"RSLMANI1", n, digest) + data[HEAD.size : HEAD.size + n]


def tamper_all(dirs: list[Path], key: str, g: int, change: Any) -> None:
    for d in dirs:
        p = manifest_path(d, key, g)
        p.write_bytes(change(p.read_bytes()))


@pytest.fixture
def signed(tmp_dirs: Any) -> tuple[list[Path], CheckpointStore]:
    """Three local replicas holding key "k" at generations 1 and 2, signed with KEY_A."""
    dirs = tmp_dirs(3)
    store = store_of(dirs, signing_key=KEY_A)
    store.save("k", state(1))
    store.save("k", state(2))
    yield dirs, store
    store.close()


# --- signing: the happy path ----------------------------------------------------------------------


def test_signed_manifests_round_trip_and_hold_no_key(signed):
    dirs, store = signed
    loaded = store.load("k")
    assert (loaded.generation, loaded.state["step"], loaded.skipped) == (2, 2, ())
    assert torch.equal(loaded.state["w"], state(2)["w"])
    raw = manifest_path(dirs[0], "k", 2).read_bytes()
    assert raw[:8] == b"RSLMANS1"
    assert raw[-40:-32].hex() == signing_key_ids(KEY_A)[0]
    m = Manifest.from_bytes(raw, where="x", keyring=store._keyring)
    assert m.key_id == signing_key_ids(KEY_A)[0]
    assert m.sha256 == __import__("hashlib").sha256(data_path(dirs[0], "k", 2).read_bytes()).hexdigest()
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                assert KEY_A.encode() not in p.read_bytes()
    assert KEY_A not in repr(store) and signing_key_ids(KEY_A)[0] in repr(store)
    assert store.verify("k").ok


def test_identity_rewrite_is_still_accepted(signed):
    """Control for the tamper tests: re-encoding without a change keeps a manifest valid, so a refusal
    below comes from the change, not from the rewriting."""
    dirs, store = signed
    tamper_all(dirs, "k", 2, lambda b: rewrite(b, lambda doc: None))
    assert store.load("k").generation == 2


@pytest.mark.parametrize("field,value", [
    ("epoch", 7),
    ("created_at", 1.0),
    ("info", {"writer": "mallory:1"}),
    ("held", 1),
    ("sha256", "0" * 64),
    ("length", 12345),
])
def test_any_changed_field_is_refused_and_load_falls_back(signed, field, value):
    dirs, store = signed
    tamper_all(dirs, "k", 2, lambda b: rewrite(b, lambda doc: doc.__setitem__(field, value)))
    loaded = store.load("k", repair=False)
    assert (loaded.generation, loaded.state["step"]) == (1, 1)
    with pytest.raises(NoCheckpointError) as info:
        store.load("k", generation=2)
    assert "SignatureError" in str(info.value) and "does not match its contents" in str(info.value)
    with pytest.raises(SignatureError) as err:
        Manifest.from_bytes(manifest_path(dirs[0], "k", 2).read_bytes(), where=f"file://{dirs[0]}/k/MANIFEST",
                            keyring=store._keyring, key="k", generation=2)
    e = err.value
    assert isinstance(e, CorruptionError)
    assert (e.key, e.generation, e.key_id) == ("k", 2, signing_key_ids(KEY_A)[0])
    assert str(dirs[0]) in str(e) and "'k'" in str(e) and "generation 2" in str(e)


def test_tampering_one_replica_is_repaired_from_the_others(signed):
    dirs, store = signed
    p = manifest_path(dirs[1], "k", 2)
    p.write_bytes(rewrite(p.read_bytes(), lambda doc: doc.__setitem__("epoch", 9)))
    report = store.verify("k")
    assert [x for x in map(str, report.problems) if "SignatureError" in x and str(dirs[1]) in x] and not report.unrecoverable
    loaded = store.load("k")
    assert loaded.generation == 2 and any(str(dirs[1]) in r for r in loaded.repaired)
    fixed = p.read_bytes()
    assert fixed[:8] == b"RSLMANS1" and Manifest.from_bytes(fixed, where="x", keyring=store._keyring).epoch == 0


def test_swapped_data_object_is_refused(signed):
    dirs, store = signed
    for d in dirs:  # generation 1's valid object under generation 2's name
        shutil.copyfile(data_path(d, "k", 1), data_path(d, "k", 2))
    loaded = store.load("k", repair=False)
    assert (loaded.generation, loaded.skipped) == (1, (2,))


def test_a_whole_generation_copied_elsewhere_is_refused(signed, tmp_dirs):
    dirs, store = signed
    for d in dirs:  # generation 1's manifest and object, signed and intact, placed as generation 3
        src, dst = manifest_path(d, "k", 1).parent, manifest_path(d, "k", 3).parent
        shutil.copytree(src, dst)
    loaded = store.load("k", repair=False)
    assert loaded.generation == 2  # generation 3 says it is generation 1: refused
    with pytest.raises(NoCheckpointError, match="manifest is for 'k' generation 1"):
        store.load("k", generation=3)


def test_object_passing_xxh3_but_not_the_signed_sha256_is_refused_before_decoding(signed, monkeypatch):
    """What a crafted object with a matching 64-bit checksum would meet: the manifest binds its SHA-256,
    checked before the codec sees a byte. (The forged manifest needs the key: a key holder makes it.)"""
    dirs, store = signed
    one = Manifest.from_bytes(manifest_path(dirs[0], "k", 1).read_bytes(), where="x", keyring=store._keyring)
    for d in dirs:
        shutil.copyfile(data_path(d, "k", 1), data_path(d, "k", 2))
        p = manifest_path(d, "k", 2)
        m = Manifest.from_bytes(p.read_bytes(), where="x", keyring=store._keyring)
        forged = Manifest(**{**m.__dict__, "length": one.length, "xxh3": one.xxh3,
                             "pieces": tuple(type(x)(x.name, one.length, one.xxh3) for x in m.pieces)})
        p.write_bytes(forged.to_bytes())
    decoded = []
    real_decode = resilient.codec.decode
    monkeypatch.setattr(resilient.codec, "decode", lambda data, **kw: decoded.append(kw["where"]) or real_decode(
        data, **kw))
    loaded = store.load("k", repair=False)
    assert (loaded.generation, loaded.skipped) == (1, (2,))
    assert decoded == ["k generation 1"]  # generation 2 never reached the codec


# --- signing: stripped, missing, wrong and rotated keys -----------------------------------------------


def test_stripped_signature_is_refused_with_a_key_and_read_without(signed, tmp_dirs):
    dirs, store = signed
    tamper_all(dirs, "k", 2, strip_signature)
    assert store.load("k", repair=False).generation == 1
    with pytest.raises(NoCheckpointError, match="not signed and a signing key is configured"):
        store.load("k", generation=2)
    with store_of(dirs) as keyless:  # no key: nothing to check signatures with
        assert keyless.load("k", repair=False).generation == 2


def test_unsigned_checkpoints_work_without_a_key_and_are_refused_with_one(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as plain:
        plain.save("k", state(1))
        assert plain.load("k").state["step"] == 1
        assert manifest_path(dirs[0], "k", 1).read_bytes()[:8] == b"RSLMANI1"
        assert b"sha256" not in manifest_path(dirs[0], "k", 1).read_bytes()
    with store_of(dirs, signing_key=KEY_A) as keyed:
        with pytest.raises(NoCheckpointError, match="not signed"):
            keyed.load("k")
        assert keyed.generations("k") == []


def test_signed_checkpoint_read_without_key_warns_once_with_the_key_id(signed, caplog):
    dirs, _ = signed
    from resilient.storage import manifest as manifest_module

    manifest_module._unchecked_warned.discard(signing_key_ids(KEY_A)[0])
    with caplog.at_level(logging.WARNING, logger="resilient"), store_of(dirs) as keyless:
        assert keyless.load("k").state["step"] == 2
        keyless.load("k", generation=1)
    warnings = [r.getMessage() for r in caplog.records if "signature is not checked" in r.getMessage()]
    assert len(warnings) == 1 and signing_key_ids(KEY_A)[0] in warnings[0]
    assert KEY_A not in caplog.text


def test_wrong_key_refuses_every_generation(signed):
    dirs, _ = signed
    with store_of(dirs, signing_key=KEY_B) as other:
        with pytest.raises(NoCheckpointError) as info:
            other.load("k")
        text = str(info.value)
        assert f"key id {signing_key_ids(KEY_A)[0]}, which is not configured" in text
        assert KEY_A not in text and KEY_B not in text
        assert other.generations("k") == []


def test_key_rotation(signed):
    dirs, _ = signed
    id_a, id_b = signing_key_ids(KEY_A)[0], signing_key_ids(KEY_B)[0]
    with store_of(dirs, signing_key=f"{KEY_B},{KEY_A}") as rotating:  # new key first, old one still verifies
        assert rotating.load("k").generation == 2
        rotating.save("k", state(3))
        assert manifest_path(dirs[0], "k", 3).read_bytes()[-40:-32].hex() == id_b
        manifest_path(dirs[2], "k", 2).unlink()  # read-repair re-signs with the new key
        assert rotating.load("k", generation=2).repaired
        assert manifest_path(dirs[2], "k", 2).read_bytes()[-40:-32].hex() == id_b
    with store_of(dirs, signing_key=KEY_B) as new_only:
        assert new_only.load("k").generation == 3
        assert new_only.generations("k") == [2, 3]  # generation 1 is signed by A on every replica
    with store_of(dirs, signing_key=KEY_A) as old_only:  # a reader left behind on the old key
        assert old_only.load("k", repair=False).generation == 2  # replicas 0-1 still hold A's manifest
        assert old_only.generations("k") == [1, 2]


def test_signing_key_setting_is_validated_and_masked():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RESILIENT_STORAGE": "memory://a", "RESILIENT_SIGNING_KEY": "short-secret"})
    assert "short-secret" not in str(info.value) and info.value.name == "RESILIENT_SIGNING_KEY"
    for bad in (f"{KEY_A},{KEY_A}", f"{KEY_A}, {KEY_B}", 12345678901234567):
        with pytest.raises(ConfigError):
            Settings.from_env({"RESILIENT_STORAGE": "memory://a"}, signing_key=bad)
    s = Settings.from_env({"RESILIENT_STORAGE": "memory://a", "RESILIENT_SIGNING_KEY": KEY_A})
    assert s.signing_key == KEY_A
    assert KEY_A not in repr(s) and KEY_A not in str(s) and KEY_A not in str(s.describe())
    assert s.redacted()["signing_key"] == "***"
    assert dict((v, t) for v, t, _ in s.describe())["RESILIENT_SIGNING_KEY"] == "***"
    unset = Settings.from_env({"RESILIENT_STORAGE": "memory://a"})
    assert unset.signing_key is None and unset.redacted()["signing_key"] is None


# --- credentials: S3 + local replicas, pickles, manifests, logs, errors -----------------------------


@pytest.fixture
def canary() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12].upper()
    return {"key": f"AKIACANARY{tag}", "secret": f"canary-secret-{tag}", "signing": f"canary-signing-{tag}"}


def assert_clean(blob: bytes | str, canary: dict[str, str], what: str) -> None:
    for name, value in canary.items():
        needle = value.encode() if isinstance(blob, bytes) else value
        assert needle not in blob, f"{name} canary found in {what}"


@pytest.fixture
def s3_env(s3_bucket: Any, tmp_dirs: Any, canary: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """The process environment of a job over two local dirs and the S3 server, its credentials and signing
    key given only through environment variables."""
    options = {k: v for k, v in s3_bucket.storage_options.items() if k not in ("key", "secret")}
    options.update(key=canary["key"], secret=canary["secret"])
    a, b = tmp_dirs(2)
    variables = {
        "RESILIENT_STORAGE": f"{a},{s3_bucket.url}/ckpt,{b}",
        "RESILIENT_STORAGE_OPTIONS": json.dumps({"s3": options}),
        "RESILIENT_SIGNING_KEY": canary["signing"],
        "RESILIENT_RETRY_ATTEMPTS": "1",
    }
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    return {"variables": variables, "dirs": [a, b], "bucket": s3_bucket, "options": options}


def all_stored_bytes(s3_env: dict) -> dict[str, bytes]:
    out = {str(p): p.read_bytes() for d in s3_env["dirs"] for p in Path(d).rglob("*") if p.is_file()}
    fs = s3_env["bucket"].storage_options
    import s3fs

    s3 = s3fs.S3FileSystem(**fs, skip_instance_cache=True)
    root = s3_env["bucket"].url[len("s3://"):]
    for p in s3.find(root):
        out[f"s3://{p}"] = s3.cat_file(p)
    return out


def test_s3_and_local_store_keeps_credentials_out_of_everything(s3_env, canary):
    from resilient.runtime.worker import JobSpec
    from tests.pipelines import simple

    settings = Settings.from_env()
    assert settings.sources["storage_options"] == settings.sources["signing_key"] == "environment"
    assert settings.in_code_secrets() == []
    with CheckpointStore(settings) as store:
        commit = store.save("job/slot-0", state(1))
        assert len(commit.acked) == 3 and any(u.startswith("s3://") for u in commit.acked)
        assert store.load("job/slot-0").state["step"] == 1
        assert_clean(repr(store) + str(store), canary, "the store's repr")
        stored = all_stored_bytes(s3_env)
        assert any(k.startswith("s3://") and k.endswith("/MANIFEST") for k in stored)
        assert sum(k.endswith("/MANIFEST") for k in stored) == 3
        for path, blob in stored.items():
            assert_clean(blob, canary, path)
    sink_url = f"{s3_env['bucket'].url}/out"
    sink = FileSink(sink_url, storage_options=settings.storage_options_for(sink_url))
    spec = JobSpec("job", simple.RunningSum, (), {}, True, sink, settings, 1)
    assert canary["secret"].encode() in pickle.dumps(settings.storage_options_for(sink_url))  # control
    for what, obj in (("settings", settings), ("sink", sink), ("job spec", spec)):
        assert_clean(repr(obj) + str(obj), canary, f"repr of the {what}")
        blob = pickle.dumps(obj)
        assert_clean(blob, canary, f"pickled {what}")
        assert b"RESILIENT_STORAGE_OPTIONS" in blob  # the secrets travel as the variable's name
    copy = pickle.loads(pickle.dumps(spec))  # same environment: the secrets come back
    assert copy.settings == settings and copy.settings.signing_key == canary["signing"]
    assert copy.sink.storage_options == settings.storage_options_for(sink_url)
    copy.sink.commit(copy.sink.stage(0, {"a": [1]}, epoch=0))
    assert sink.read(0) == {"a": [1]}
    with CheckpointStore(copy.settings) as again:
        assert again.load("job/slot-0").state["step"] == 1


def _unpickle_elsewhere(blob: bytes, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import pickle, sys\n"
        "obj = pickle.loads(sys.stdin.buffer.read())\n"
        "s = getattr(obj, 'settings', obj)\n"
        "print('ok', s.signing_key is not None)\n"
    )
    return subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=120,
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_another_process_reads_secrets_from_its_own_environment_only(s3_env, canary):
    settings = Settings.from_env()
    blob = pickle.dumps(settings)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_")}
    done = _unpickle_elsewhere(blob, {**base, **s3_env["variables"]})
    assert done.returncode == 0 and done.stdout.split() == [b"ok", b"True"], done.stderr[-2000:]
    done = _unpickle_elsewhere(blob, base)  # the receiving process lacks the variables
    assert done.returncode != 0
    assert b"ConfigError" in done.stderr and b"RESILIENT_" in done.stderr and b"runtime_env" in done.stderr
    assert_clean(done.stderr, canary, "the error of a process without the variables")
    other_key = {**s3_env["variables"], "RESILIENT_SIGNING_KEY": KEY_B}  # the same name, another key
    done = _unpickle_elsewhere(blob, {**base, **other_key})
    assert done.returncode != 0 and b"RESILIENT_SIGNING_KEY" in done.stderr and b"key ids" in done.stderr


def test_secrets_given_in_code_stay_in_their_process(tmp_dirs, canary):
    dirs = tmp_dirs(2)
    settings = Settings.from_env({}, storage=[str(d) for d in dirs], signing_key=canary["signing"],
                                 storage_options={"s3": {"key": canary["key"], "secret": canary["secret"]}})
    assert settings.in_code_secrets() == ["keyword 'storage_options'", "keyword 'signing_key'"]
    sink = FileSink("s3://AKIA:" + canary["secret"] + "@bucket/out", storage_options={"secret": canary["secret"]})
    for obj in (settings, sink):
        blob = pickle.dumps(obj)
        assert_clean(blob, canary, "a pickle of values given in code")
        same = pickle.loads(blob)  # this process made the tokens: it resolves them
        assert repr(same) == repr(obj)
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert pickle.loads(pickle.dumps(sink)).storage_options == {"secret": canary["secret"]}
    done = _unpickle_elsewhere(pickle.dumps(settings), dict(os.environ))
    assert done.returncode != 0 and b"ConfigError" in done.stderr and b"given in code" in done.stderr
    assert_clean(done.stderr, canary, "the error of another process")


def test_aws_variables_are_used_and_never_copied(s3_bucket, tmp_dirs, canary, monkeypatch):
    options = {k: v for k, v in s3_bucket.storage_options.items() if k not in ("key", "secret")}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", canary["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary["secret"])
    (a,) = tmp_dirs(1)
    settings = Settings.from_env({}, storage=[str(a), f"{s3_bucket.url}/aws"], storage_options={"s3": options},
                                 write_quorum="all", **FAST)
    with CheckpointStore(settings) as store:
        store.save("k", state(4))
        assert store.load("k").state["step"] == 4
        store.replicas[1].backend.fs.invalidate_cache()
        assert store.replicas[1].backend.fs.key is None  # s3fs left the credentials to botocore's chain
    assert_clean(pickle.dumps(settings) + repr(settings).encode(), canary, "settings with AWS_* credentials")


def test_failures_log_and_raise_without_credentials(s3_env, canary, caplog, monkeypatch):
    broken = {**s3_env["options"], "endpoint_url": "http://127.0.0.1:9"}  # nothing listens there
    monkeypatch.setenv("RESILIENT_STORAGE_OPTIONS", json.dumps({"s3": broken}))
    with caplog.at_level(logging.DEBUG, logger="resilient"):
        settings = Settings.from_env(write_quorum=2)
        with CheckpointStore(settings) as store:
            commit = store.save("k", state(1))  # the two local replicas carry it
            assert len(commit.acked) == 2 and commit.failed
            failed_text = json.dumps(commit.failed)
            assert "127.0.0.1:9" in failed_text  # control: the failure is described
            assert_clean(failed_text + str(store.health()), canary, "the failure report")
            assert store.load("k").state["step"] == 1
        with CheckpointStore(settings.with_options(write_quorum="all")) as store:
            with pytest.raises(QuorumError) as info:
                store.save("k", state(2))
            assert isinstance(info.value.failures[f"{s3_env['bucket'].url}/ckpt"],
                              (TransientStorageError, PermanentStorageError))
            assert_clean(str(info.value) + repr(info.value), canary, "the quorum error")
    assert "committed on 2 of 3 replicas" in caplog.text  # control: the failure was logged
    assert_clean(caplog.text, canary, "the logs")


@pytest.mark.parametrize("text", [
    '{"s3": {"key": "%(key)s", "secret": "%(secret)s"',  # truncated JSON
    '{"s3": {"key": "%(key)s", "secret": "%(secret)s"}, "not a protocol!": {}}',
    '{"s3": ["%(key)s", "%(secret)s"]}',
    '["%(secret)s"]',
])
def test_bad_storage_options_variable_never_shows_its_credentials(text, canary, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as info:
        Settings.from_env({"RESILIENT_STORAGE": "memory://a", "RESILIENT_STORAGE_OPTIONS": text % canary})
    assert info.value.name == "RESILIENT_STORAGE_OPTIONS"
    assert_clean(str(info.value) + repr(info.value.value) + caplog.text, canary, "the config error")


# --- a real Ray actor -------------------------------------------------------------------------------


def test_ray_actor_gets_settings_without_secrets_and_uses_storage(ray_session, s3_env, canary):
    import ray
    from ray import cloudpickle

    from resilient.io.sources import RangeSource
    from resilient.runtime.supervisor import INF
    from resilient.runtime.worker import JobSpec, Worker
    from tests.pipelines import simple

    settings = Settings.from_env(checkpoint_every=1, write_quorum=2)
    sink_url = f"{s3_env['bucket'].url}/out"
    sink = FileSink(sink_url, storage_options=settings.storage_options_for(sink_url))
    spec = JobSpec("sec", simple.RunningSum, (), {}, True, sink, settings, 1)
    assert canary["secret"].encode() in cloudpickle.dumps(settings.storage_options_for(sink_url))  # control
    assert_clean(cloudpickle.dumps(spec), canary, "the actor's pickled arguments")
    batches = list(RangeSource(20, 10).read(0))
    with CheckpointStore(settings) as store:
        epoch = store.claim_epoch("sec/slot-0")
        # started after ray.init, so Ray's workers inherit none of these variables: hand them over the way
        # a `ray job submit` run does
        env_vars = dict(s3_env["variables"])
        actor = ray.remote(max_restarts=0)(Worker).options(
            num_cpus=0.25, runtime_env={"env_vars": env_vars}).remote(spec, 0, epoch)
        try:
            assert ray.get(actor.restore.remote(), timeout=120) == 0
            for b, batch in batches:
                [result] = ray.get(actor.process.remote((INF, [(b, batch, False)])), timeout=120)
                assert sink.commit_group([result.output]) == [True]
            assert ray.get(actor.finish.remote(INF), timeout=120)["cursor"] == 2
        finally:
            ray.kill(actor)
        loaded = store.load("sec/slot-0")  # written by the actor, signed with the key it read from its env
        assert loaded.state["user"] == {"total": sum(range(20)), "batches": 2}
        manifests = [m for m in all_stored_bytes(s3_env) if m.endswith("/MANIFEST") and "sec/slot-0" in m]
        assert manifests and all(all_stored_bytes(s3_env)[m][:8] == b"RSLMANS1" for m in manifests)
        assert sink.read(1)["running"] == [sum(range(20))] * 10
        for path, blob in all_stored_bytes(s3_env).items():
            assert_clean(blob, canary, path)

        bare = ray.remote(max_restarts=0)(Worker).options(num_cpus=0.25).remote(spec, 0, epoch)
        for _ in range(20):  # no variables: no secrets at all
            with pytest.raises(ray.exceptions.RayActorError) as info:
                ray.get(bare.ready.remote(), timeout=120)
            if not isinstance(info.value, ray.exceptions.ActorUnavailableError):
                break  # "unavailable" can come before Ray knows the constructor failed: ask again
            time.sleep(0.1)
        assert "ConfigError" in str(info.value) and "RESILIENT_" in str(info.value)
        assert_clean(str(info.value), canary, "the actor's creation error")
