"""The public surface: exported names, the README's configuration table, the example, secrets."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import resilient
from resilient.config import Settings, reference_table
from resilient.errors import QuorumError

ROOT = Path(__file__).resolve().parent.parent


def test_exported_names_are_pinned():
    assert resilient.__all__ == sorted(resilient.__all__)
    assert set(resilient.__all__) == {
        "CheckpointStore", "CodecError", "Commit", "ConfigError", "CorruptionError", "FencedError", "Loaded",
        "NoCheckpointError", "PendingSave", "PermanentStorageError", "QuorumError", "RedundancyWarning",
        "ReplicaHealth", "ResilientError", "RetryPolicy", "Settings", "StorageError", "TransientStorageError",
        "UnsafeCheckpointError", "UnsupportedTypeError", "VerifyReport", "__version__", "is_transient",
        "DeadLetter", "JobFailedError", "JobHandle", "JobMismatchError", "JobResult", "JobStoppedError", "Pipeline", "pipeline",
    }
    for name in resilient.__all__:
        assert getattr(resilient, name) is not None


def test_readme_configuration_table_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    assert reference_table() in readme


def test_readme_opens_with_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ")[1]
    commands = [l.split("#")[0].strip() for l in first_section.split("```bash")[1].split("```")[0].splitlines() if l.strip()]
    assert commands == ["python3 dev.py example", "python3 dev.py test"]
    assert "exec python3 dev.py test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("mode", ["replicate", "parity"])
def test_example_runs_end_to_end(tmp_path, mode):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "checkpoint_roundtrip.py"), "--root", str(tmp_path), "--mode", mode],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "outputs identical: True" in done.stdout and "verify: ok" in done.stdout


def test_credentials_in_urls_never_show(tmp_path):
    url = "s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@bucket/ckpt"
    settings = Settings.from_env({}, storage=[str(tmp_path / "a"), url], write_quorum=1)
    assert "wJalrXUtnFEMIsecret" not in repr(settings)
    store = resilient.CheckpointStore(settings, backends=[_Dead(str(tmp_path / "a")), _Dead(url)])
    assert "wJalrXUtnFEMIsecret" not in repr(store)
    with pytest.raises(QuorumError) as e:
        store.save("k", {"x": 1})
    assert "wJalrXUtnFEMIsecret" not in str(e.value)
    assert all("wJalrXUtnFEMIsecret" not in (h.last_error or "") + h.url for h in store.health())
    store.close()


class _Dead:
    """A backend whose every operation fails with a message that would echo its URL."""

    protocol = "s3"

    def __init__(self, url: str) -> None:
        from resilient.config import redact_url

        self._raw = url
        self.url = redact_url(url)

    def __getattr__(self, name):
        def fail(*a, **k):
            raise PermissionError(f"access denied for {self._raw}")

        fail.__name__ = name
        return fail


def test_settings_pickle_for_shipping_to_actors(tmp_path):
    s = Settings.from_env({"RESILIENT_STORAGE": f"{tmp_path}/a,{tmp_path}/b", "RESILIENT_KEEP": "4"})
    assert pickle.loads(pickle.dumps(s)) == s


def test_score_pipeline_example_survives_a_killed_worker(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "score_pipeline.py"), "--rows", "60000", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "every row scored exactly once: True" in done.stdout
