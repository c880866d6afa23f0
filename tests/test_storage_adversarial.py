"""Storage that nothing can trick into losing a checkpoint: each case on real directories, real symbolic
links, real FIFOs and crafted manifests whose checksums are recomputed (only the deeper checks can refuse
them).

Cases: a symbolic link in place of a generation (gc and the retention of a save must not delete what it
points to); junk manifests of newer generations on one replica (with and without a signing key: gc and
retention keep the genuine ones); rot of the newest generations everywhere (gc keeps the last loadable
ones); a checksum-valid object that is not a resilient object (load falls back, verify names it, repair
does not copy it); ``../`` names and impossible parity geometry in one replica's manifest (load falls
back, store-wide maintenance goes on with the other keys); a FIFO in place of an object or manifest (no
hang). Every wait on a load that could hang is bounded, so a regression fails instead of hanging.
"""

from __future__ import annotations

import io
import subprocess
import sys
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import xxhash

from resilient.cli import main
from resilient.errors import NoCheckpointError
from resilient.storage import CheckpointStore, layout
from resilient.storage.manifest import Manifest, ShardInfo

HEAD = struct.Struct("<8sI8s")
SIGNING_KEY = "adversarial-key-" + "c3" * 12
FAST = {"retry_attempts": 1, "retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.02}
KEY = "k"


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 32, generator=g), "ids": torch.arange(step, step + 300), "step": step}


def assert_step(loaded: Any, step: int) -> None:
    want = state(step)
    assert loaded["step"] == step
    assert torch.equal(loaded["w"], want["w"]) and torch.equal(loaded["ids"], want["ids"])


def store_of(dirs: list[Path], **kw: Any) -> CheckpointStore:
    return CheckpointStore(storage=[str(d) for d in dirs], **{**FAST, **kw})


def gdir(root: Path, g: int, key: str = KEY) -> Path:
    return root.joinpath(*layout.gen_dir(key, g).split("/"))


def objects(root: Path, g: int, key: str = KEY) -> list[Path]:
    return sorted(p for p in gdir(root, g, key).iterdir() if p.name != layout.MANIFEST)


def gens_on(root: Path, key: str = KEY) -> list[int]:
    return sorted(g for g in map(layout.parse_gen_name, os.listdir(root / key)) if g is not None)


def cli(*argv: str, dirs: list[Path], **env: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    environ = {"RESILIENT_STORAGE": ",".join(map(str, dirs)), "RESILIENT_RETRY_ATTEMPTS": "1", **env}
    code = main(list(argv), environ=environ, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def reframe(doc: dict) -> bytes:
    """An unsigned manifest holding `doc`, with a correct header and checksum."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return HEAD.pack(b"RSLMANI1", len(body), xxhash.xxh3_64_digest(body)) + body


def edit_manifest(root: Path, g: int, change: Callable[[dict], None], key: str = KEY) -> None:
    p = gdir(root, g, key) / layout.MANIFEST
    data = p.read_bytes()
    _, n, _ = HEAD.unpack_from(data)
    doc = json.loads(data[HEAD.size : HEAD.size + n])
    change(doc)
    p.write_bytes(reframe(doc))


def plant_object(root: Path, g: int, blob: bytes, key: str = KEY) -> None:
    """Replace generation `g`'s object on `root` with `blob` and make its manifest consistent with it
    (length and xxh3 recomputed): only a decode can tell it is not a checkpoint."""
    (obj,) = objects(root, g, key)
    obj.write_bytes(blob)
    digest = xxhash.xxh3_64_hexdigest(blob)

    def change(doc: dict) -> None:
        doc["length"], doc["xxh3"] = len(blob), digest
        doc["pieces"] = [{"name": obj.name, "length": len(blob), "xxh3": digest}]

    edit_manifest(root, g, change, key)


def torch_save_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(8)}, buf)
    return buf.getvalue()


def bounded(fn: Callable[[], Any], seconds: float = 10.0) -> Any:
    """fn() run in a thread; fails the test (instead of hanging it) if it has not returned in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        release_fifos()  # unblock the reader, so closing the store afterwards does not hang too
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


_FIFOS: list[Path] = []


def make_fifo(path: Path) -> None:
    """Replace `path` with a FIFO (no writer ever opens it: a blocking read of it never returns)."""
    path.unlink()
    os.mkfifo(path)
    _FIFOS.append(path)


def release_fifos() -> None:
    """Give every blocked reader of a planted FIFO its end of file (a writer that opens and closes)."""
    for _ in range(50):
        for p in _FIFOS:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        threading.Event().wait(0.02)


def victim(tmp_path: Path) -> Path:
    """A directory outside every replica, with files and a subdirectory, that nothing may delete."""
    v = tmp_path / "victim"
    (v / "sub").mkdir(parents=True)
    (v / "precious.txt").write_text("keep me")
    (v / "sub" / "nested.txt").write_text("keep me too")
    (v / layout.MANIFEST).write_bytes(b"junk")
    return v


def intact(v: Path) -> bool:
    return (v / "precious.txt").read_text() == "keep me" and (v / "sub" / "nested.txt").exists()


# --- 1. symbolic links: gc and retention never delete outside the store ----------------------------


def test_gc_delete_never_follows_a_symlinked_generation_out_of_the_store(tmp_dirs, tmp_path):
    dirs = tmp_dirs(3)
    v = victim(tmp_path)
    with store_of(dirs, keep=3) as store:
        for s in (1, 2, 3):
            store.save(KEY, state(s))
    os.symlink(v, gdir(dirs[0], 0))
    code, out, err = cli("gc", "--delete", "--grace-seconds", "0", dirs=dirs)
    assert code == 0, err
    assert intact(v), "gc deleted files outside the store through a symbolic link"
    assert not os.path.lexists(gdir(dirs[0], 0))  # the link itself (inside the store) is gone
    with store_of(dirs) as store:
        assert_step(store.load(KEY).state, 3)


def test_retention_of_a_save_never_follows_symlinks_out_of_the_store(tmp_dirs, tmp_path):
    dirs = tmp_dirs(3)
    v = victim(tmp_path)
    with store_of(dirs, keep=2) as store:
        store.save(KEY, state(1))
        os.symlink(v, gdir(dirs[0], 0))  # an old generation that is a link out
        os.symlink(v, gdir(dirs[1], 1) / "escape")  # a link inside a generation retention deletes
        for s in (2, 3):
            store.save(KEY, state(s))
        store.flush()
        assert intact(v), "retention deleted files outside the store through a symbolic link"
        assert all(gens_on(d) == [2, 3] for d in dirs)
        assert_step(store.load(KEY).state, 3)


def test_a_symlinked_key_directory_is_never_followed(tmp_dirs, tmp_path):
    """A key directory that is a link out: nothing through it is read, written or deleted."""
    dirs = tmp_dirs(3)
    with store_of(dirs, keep=1) as store:
        store.save(KEY, state(1))
    outside = tmp_path / "outside"
    os.replace(dirs[0] / KEY, outside)  # a genuine-looking key tree, now outside the store
    os.symlink(outside, dirs[0] / KEY)
    before = sorted(str(p) for p in outside.rglob("*"))
    with store_of(dirs, keep=1) as store:
        store.save(KEY, state(2))  # committed on the two other replicas; retention runs
        store.flush()
        store.gc(dry_run=False, grace_s=0)
        assert_step(store.load(KEY, repair=True).state, 2)
    assert sorted(str(p) for p in outside.rglob("*")) == before


def test_names_that_leave_a_local_root_are_refused(tmp_path):
    from resilient.errors import PermanentStorageError
    from resilient.storage.replica import LocalReplica

    (tmp_path / "root").mkdir()
    (tmp_path / "secret.txt").write_text("x")
    r = LocalReplica(str(tmp_path / "root"), "file://root")
    for rel in ("../secret.txt", "a/../../secret.txt", "a//b", "./x"):
        with pytest.raises(PermanentStorageError, match="refused"):
            r.read(rel)
    with pytest.raises(PermanentStorageError, match="refused"):
        r.create_pointers(["ok", "../escape"], "t")
    assert not (tmp_path / "escape").exists() and (tmp_path / "secret.txt").exists()


def test_a_symlinked_generation_is_never_read(tmp_dirs, tmp_path):
    """A generation reached through a link out of the store is refused, not read: its copy elsewhere is."""
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
    outside = tmp_path / "outside"
    os.replace(gdir(dirs[0], 1), outside)
    os.symlink(outside, gdir(dirs[0], 1))
    with store_of(dirs) as store:
        loaded = store.load(KEY, repair=False)
        assert_step(loaded.state, 1)
        report = store.verify()
        assert any(str(dirs[0]) in str(p) and "symbolic link" in str(p) for p in report.problems), report.problems


# --- 1. gc and retention count only generations that verify on a quorum ----------------------------


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
def test_junk_manifests_on_one_replica_do_not_make_gc_delete_genuine_generations(tmp_dirs, signing):
    dirs = tmp_dirs(3)
    env = {"RESILIENT_SIGNING_KEY": SIGNING_KEY} if signing else {}
    kw = {"signing_key": SIGNING_KEY} if signing else {}
    with store_of(dirs, keep=3, **kw) as store:
        for s in (1, 2, 3):
            store.save(KEY, state(s))
    for g in (4, 5, 6):
        gdir(dirs[0], g).mkdir()
        (gdir(dirs[0], g) / layout.MANIFEST).write_bytes(b"junk")
    code, out, err = cli("gc", "--delete", "--grace-seconds", "0", dirs=dirs, **env)
    assert code == 0, err
    assert all({1, 2, 3} <= set(gens_on(d)) for d in dirs), out
    with store_of(dirs, **kw) as store:
        loaded = store.load(KEY)
        assert loaded.generation == 3
        assert_step(loaded.state, 3)


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
def test_junk_manifests_on_one_replica_do_not_make_retention_delete_genuine_generations(tmp_dirs, signing):
    dirs = tmp_dirs(3)
    kw = {"signing_key": SIGNING_KEY} if signing else {}
    with store_of(dirs, keep=3, **kw) as store:
        for s in (1, 2, 3):
            store.save(KEY, state(s))
    for g in (4, 5, 6):
        gdir(dirs[0], g).mkdir()
        (gdir(dirs[0], g) / layout.MANIFEST).write_bytes(b"junk")
    with store_of(dirs, keep=3, **kw) as store:  # a new process: nothing proven from memory but its own save
        assert store.save(KEY, state(7)).generation == 7
        store.flush()
        # 7, 3 and 2 verify: only 1 may go; the junk generations count for nothing
        assert all({2, 3, 7} <= set(gens_on(d)) and 1 not in gens_on(d) for d in dirs)
        assert_step(store.load(KEY).state, 7)
        assert_step(store.load(KEY, generation=2).state, 2)


def test_gc_keeps_the_last_loadable_generations_when_the_newest_rot_everywhere(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs, keep=5) as store:
        for s in range(1, 6):
            store.save(KEY, state(s))
    for d in dirs:
        for g in (3, 4, 5):
            (obj,) = objects(d, g)
            data = bytearray(obj.read_bytes())
            data[len(data) // 2] ^= 0x40
            obj.write_bytes(bytes(data))
    code, out, err = cli("gc", "--delete", "--grace-seconds", "0", dirs=dirs, RESILIENT_KEEP="2")
    assert code == 0, err
    assert all({1, 2} <= set(gens_on(d)) for d in dirs), out
    with store_of(dirs) as store:
        loaded = store.load(KEY)
        assert loaded.generation == 2
        assert_step(loaded.state, 2)


def test_a_generation_on_fewer_replicas_than_the_quorum_does_not_count(tmp_dirs):
    """Generation 3 verifies on one replica of three only (quorum 2): it is not proven, so 1 stays."""
    dirs = tmp_dirs(3)
    with store_of(dirs, keep=5) as store:
        for s in (1, 2, 3):
            store.save(KEY, state(s))
    for d in dirs[1:]:
        (gdir(d, 3) / layout.MANIFEST).unlink()
    code, out, err = cli("gc", "--delete", "--grace-seconds", "0", dirs=dirs, RESILIENT_KEEP="2")
    assert code == 0, err
    assert all(gens_on(d) == [1, 2, 3] for d in dirs), out  # only 2 and 1 are proven: nothing goes


# --- 2. a checksum-valid object that does not decode ------------------------------------------------


def test_undecodable_generation_falls_back_and_verify_names_it(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
        store.save(KEY, state(2))
    blob = torch_save_bytes()
    for d in dirs:
        plant_object(d, 2, blob)
    with store_of(dirs) as store:
        loaded = store.load(KEY, repair=False)
        assert (loaded.generation, loaded.skipped) == (1, (2,))
        assert_step(loaded.state, 1)
    code, out, err = cli("verify", dirs=dirs)
    assert code == 1, out
    flagged = [line for line in out.splitlines() if line.startswith("PROBLEM") and "does not decode" in line]
    assert len(flagged) == 3 and all(any(str(d) in line for line in flagged) for d in dirs), out
    assert "UNRECOVERABLE k generation 2" in out


def test_repair_never_copies_an_object_that_does_not_decode(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
        store.save(KEY, state(2))
    blob = torch_save_bytes()
    plant_object(dirs[0], 2, blob)
    for d in dirs[1:]:
        for p in objects(d, 2):
            p.unlink()
    code, out, err = cli("repair", dirs=dirs)
    assert code == 1, out  # generation 2 cannot be rebuilt: problems remain
    for d in dirs[1:]:
        assert all(p.read_bytes() != blob for p in objects(d, 2)), "repair copied an undecodable object"
    with store_of(dirs) as store:
        assert_step(store.load(KEY).state, 1)


def test_an_altered_copy_on_one_replica_is_outvoted_and_repaired(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
    plant_object(dirs[0], 1, torch_save_bytes())
    with store_of(dirs) as store:
        loaded = store.load(KEY)
        assert loaded.generation == 1 and loaded.skipped == ()
        assert any(str(dirs[0]) in r for r in loaded.repaired)
        assert store.verify().ok


# --- 2. unsafe names, impossible geometry: fall back, and maintenance goes on ---------------------


def test_unsafe_names_in_one_replicas_manifest_fall_back_to_another_replica(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
        store.save("other", state(5))

    def escape(doc: dict) -> None:
        doc["pieces"][0]["name"] = "../../../../etc/passwd"

    edit_manifest(dirs[0], 1, escape)
    with store_of(dirs) as store:
        assert_step(store.load(KEY, repair=False).state, 1)
        report = store.verify()
        assert {(KEY, 1), ("other", 1)} <= set(report.checked)
        assert any("not a plain object name" in str(p) and str(dirs[0]) in str(p) for p in report.problems)
        assert store.repair()  # the bad manifest is rewritten from a good one
        assert store.verify().ok
    code, _, err = cli("gc", "--delete", dirs=dirs)
    assert code == 0 and "Traceback" not in err


@pytest.mark.parametrize("block", [0, 2**40])
def test_impossible_parity_geometry_on_one_replica(tmp_dirs, block):
    dirs = tmp_dirs(3)
    with store_of(dirs, redundancy="parity") as store:
        store.save(KEY, state(1))
        store.save("other", state(5))
    edit_manifest(dirs[0], 1, lambda doc: doc.update(block=block))
    with store_of(dirs, redundancy="parity") as store:
        assert_step(bounded(lambda: store.load(KEY, repair=False)).state, 1)
        report = bounded(store.verify)
        assert {(KEY, 1), ("other", 1)} <= set(report.checked)
        assert any(f"parity block size {block}" in str(p) for p in report.problems), report.problems
        bounded(store.repair)
        assert store.verify().ok
    for command in (("verify",), ("repair",), ("gc", "--delete")):
        code, _, err = cli(*command, dirs=dirs, RESILIENT_REDUNDANCY="parity")
        assert code == 0 and "Traceback" not in err, (command, err)


@pytest.mark.parametrize("block", [0, 2**40])
def test_impossible_parity_geometry_everywhere_falls_back_to_an_older_generation(tmp_dirs, block):
    dirs = tmp_dirs(3)
    with store_of(dirs, redundancy="parity") as store:
        store.save(KEY, state(1))
        store.save(KEY, state(2))
    for d in dirs:
        edit_manifest(d, 2, lambda doc: doc.update(block=block))
    with store_of(dirs, redundancy="parity") as store:
        loaded = bounded(lambda: store.load(KEY, repair=False))
        assert loaded.generation == 1
        assert_step(loaded.state, 1)


def test_store_wide_maintenance_goes_on_past_a_key_that_fails(tmp_dirs):
    """A key whose examination raises is reported; every other key is still verified, repaired, gc'ed."""
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save("good", state(1))
        store.save("bad", state(2))
    (objects(dirs[1], 1, "good")[0]).unlink()  # something for repair to do on the good key

    with store_of(dirs) as store:
        listing = store.set.list_generations

        def exploding(key: str):  # the replica set every maintenance pass lists generations through
            if key == "bad":
                raise OSError("listing failed")
            return listing(key)

        store.set.list_generations = exploding
        report = store.verify()
        assert ("good", 1) in report.checked and [k for k, _ in report.unexamined] == ["bad"]
        assert any(p.kind == "unexamined" and p.key == "bad" and "could not be examined" in str(p)
                   for p in report.problems)
        assert any("good" in p for p in store.repair())
        store.gc(dry_run=False, grace_s=0)
        assert store.verify("good").ok


# --- 1/2. special files: never opened in a blocking way ---------------------------------------------


def test_a_fifo_in_place_of_a_data_object_neither_hangs_load_nor_verify(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
    (obj,) = objects(dirs[0], 1)
    make_fifo(obj)
    with store_of(dirs) as store:
        assert_step(bounded(lambda: store.load(KEY, repair=False)).state, 1)
        report = bounded(store.verify)
        assert any("FIFO" in str(p) and str(dirs[0]) in str(p) for p in report.problems), report.problems
    code, out, _ = bounded(lambda: cli("verify", dirs=dirs))
    assert code == 1 and "FIFO" in out
    code, _, err = bounded(lambda: cli("gc", "--delete", "--grace-seconds", "0", dirs=dirs))
    assert code == 0, err


def test_a_fifo_in_place_of_a_manifest_does_not_hang_load(tmp_dirs):
    dirs = tmp_dirs(3)
    with store_of(dirs) as store:
        store.save(KEY, state(1))
    make_fifo(gdir(dirs[0], 1) / layout.MANIFEST)
    with store_of(dirs) as store:
        assert_step(bounded(lambda: store.load(KEY, repair=False)).state, 1)
        assert bounded(lambda: store.generations(KEY)) == [1]


def test_a_fifo_everywhere_ends_in_no_checkpoint_not_a_hang(tmp_dirs):
    dirs = tmp_dirs(2)
    with store_of(dirs, write_quorum=1) as store:
        store.save(KEY, state(1))
    for d in dirs:
        (obj,) = objects(d, 1)
        make_fifo(obj)
    with store_of(dirs, write_quorum=1) as store:
        with pytest.raises(NoCheckpointError, match="FIFO"):
            bounded(lambda: store.load(KEY, repair=False))


def test_manifest_of_another_shape_is_still_a_manifest_ok(tmp_dirs):
    """The geometry checks accept what a save writes, for both modes and an empty object."""
    dirs = tmp_dirs(3)
    for mode in ("replicate", "parity"):
        with store_of(dirs, redundancy=mode) as store:
            store.save(f"shape-{mode}", {})
            store.save(f"shape-{mode}", state(3))
            assert store.verify(f"shape-{mode}").ok
            raw = (gdir(dirs[0], 2, f"shape-{mode}") / layout.MANIFEST).read_bytes()
            m = Manifest.from_bytes(raw, where="x")
            assert all(isinstance(p, ShardInfo) for p in m.pieces)


# --- 3. secrets are masked by their shape, everywhere, and never pickled in clear -------------------

PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nPEM-CANARY-9\nb3BlbnNzaC1rZXktdjEA\n-----END OPENSSH PRIVATE KEY-----"
SECRET_OPTIONS = {
    "sftp": {"passphrase": "PP-CANARY-1", "identity": PEM, "password": "PW-CANARY-12"},
    "az": {
        "connection_string": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=AK-CANARY-2==;"
                             "EndpointSuffix=core.windows.net",
        "conn": "BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature=sv=2020&sig=SAS-CANARY-4",
        "endpoint": "https://acct.blob.core.windows.net/c?sv=2020-08-04&sig=SIG-CANARY-3&se=2030",
        "client_secret": "CS-CANARY-10",
        "region_name": "westeurope",
    },
    "https": {
        "headers": {"Authorization": "Bearer BEARER-CANARY-5", "Cookie": "sid=COOKIE-CANARY-6",
                    "Proxy-Authorization": "Basic PROXY-CANARY-7", "X-Custom": "CUSTOM-CANARY-8"},
        "client_kwargs": {"token": "TOK-CANARY-11", "endpoint_url": "http://127.0.0.1:9000"},
    },
}
CANARIES = [f"CANARY-{i}" for i in range(1, 13)]
VISIBLE = ["westeurope", "http://127.0.0.1:9000", "Proxy-Authorization", "acct.blob.core.windows.net"]


def leaked(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return [c for c in CANARIES if c in text]


@pytest.mark.parametrize("source", ["keyword", "environment"])
def test_every_shape_of_secret_is_masked_and_never_pickled(source, monkeypatch):
    import pickle

    from resilient.config import Settings

    if source == "keyword":
        settings = Settings.from_env({}, storage=["memory://a"], storage_options=SECRET_OPTIONS)
    else:
        monkeypatch.setenv("RESILIENT_STORAGE_OPTIONS", json.dumps(SECRET_OPTIONS))
        monkeypatch.setenv("RESILIENT_STORAGE", "memory://a")
        settings = Settings.from_env()
    shown = {"repr": repr(settings), "describe": repr(settings.describe()), "redacted": repr(settings.redacted())}
    for what, text in shown.items():
        assert leaked(text) == [], (what, text)
    assert all(v in shown["describe"] for v in VISIBLE), shown["describe"]
    blob = pickle.dumps(settings)
    assert leaked(blob) == []
    back = pickle.loads(blob)  # in this process every secret comes back
    assert back.storage_options_for("az://c")["client_secret"] == "CS-CANARY-10"
    assert back.storage_options_for("https://h/x")["headers"]["Cookie"] == "sid=COOKIE-CANARY-6"
    assert back.storage_options_for("sftp://h/x")["identity"] == PEM


def test_cli_config_masks_every_shape_of_secret(tmp_dirs):
    dirs = tmp_dirs(1)
    for fmt in ((), ("--json",)):
        code, out, err = cli("config", *fmt, dirs=dirs, RESILIENT_STORAGE_OPTIONS=json.dumps(SECRET_OPTIONS))
        assert code == 0, err
        assert leaked(out + err) == [], out
        assert "westeurope" in out


def test_secret_shapes_in_free_text_are_masked():
    from resilient.config import redact_url

    text = ("failed: AccountKey=AK-CANARY-2== for Authorization: Bearer BEARER-CANARY-5\n"
            "Cookie: sid=COOKIE-CANARY-6\n" + PEM + " https://u:PW-CANARY-12@host/p?token=TOK-CANARY-11")
    assert leaked(redact_url(text)) == [], redact_url(text)


# --- 4. the CLI: a closed pipe, malformed sink files ----------------------------------------------


def _cli_process(*argv: str, stdout: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient.cli", *argv], stdout=stdout, stderr=subprocess.PIPE,
                          env={**os.environ, **env}, timeout=120)


def test_cli_config_into_a_closed_pipe_ends_quietly(tmp_dirs):
    dirs = tmp_dirs(1)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: every write meets EPIPE
    try:
        done = _cli_process("config", stdout=write_end, env={"RESILIENT_STORAGE": str(dirs[0])})
    finally:
        os.close(write_end)
    assert done.stderr.decode() == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as other commands end


@pytest.mark.parametrize("marker", [b"not json", b"\xff\xfe\x00junk", b"[1, 2]"])
def test_gc_sink_with_a_malformed_success_marker_gives_one_clear_line(tmp_dirs, tmp_path, marker):
    from resilient.io import FileSink

    dirs = tmp_dirs(2)
    sink_url = str(tmp_path / "out")
    sink = FileSink(sink_url)
    assert sink.commit(sink.stage(0, {"id": [0]}, epoch=1))
    (tmp_path / "out" / "_SUCCESS").write_bytes(marker)
    code, out, err = cli("gc", "--sink", sink_url, "--delete", dirs=dirs)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "_SUCCESS" in err and sink_url in err


def test_gc_sink_with_a_malformed_layout_record_gives_one_clear_line(tmp_dirs, tmp_path):
    """A guard: the sink refuses a damaged _sink.json with a CorruptionError, one line."""
    from resilient.io import FileSink

    dirs = tmp_dirs(2)
    sink_url = str(tmp_path / "out")
    sink = FileSink(sink_url)
    sink.stage(0, {"id": [0]}, epoch=1)
    assert sink.commit(sink.stage(0, {"id": [0]}, epoch=2))
    sink.mark_complete({"total": 1})
    (tmp_path / "out" / "_sink.json").write_bytes(b"{not json")
    code, out, err = cli("gc", "--sink", sink_url, dirs=dirs)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "not a sink layout record" in err