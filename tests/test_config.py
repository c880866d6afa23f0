"""Settings: precedence, validation of every field, cross-field rules, redaction, pickling."""

from __future__ import annotations

import dataclasses
import doctest
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import resilient.config as config
from resilient.config import FIELDS, RedundancyWarning, Settings, redact_url, reference_table
from resilient.errors import ConfigError

THREE = "memory://a,memory://b,memory://c"
SECRET = "wJalrXUtnFEMI0K7MDENGbPxRfiCYEXAMPLEKEY"


def env(**variables: str) -> dict[str, str]:
    """An environment with storage set (so no default-storage warning) plus ``variables``."""
    return {"RESILIENT_STORAGE": THREE, **{f"RESILIENT_{k.upper()}": v for k, v in variables.items()}}


def described(settings: Settings) -> dict[str, str]:
    return {variable: text for variable, text, _source in settings.describe()}


@pytest.fixture(autouse=True)
def _no_stray_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RedundancyWarning)
        yield


# --- defaults, precedence -------------------------------------------------------------------------


def test_defaults_and_default_storage_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(RedundancyWarning, match="RESILIENT_STORAGE is not set.*no redundancy"):
        s = Settings.from_env({})
    assert s.storage == (f"file://{tmp_path}/.resilient/store",)
    assert s.storage_options == {}
    assert (s.redundancy, s.write_quorum, s.keep, s.compression, s.compression_level) == (
        "replicate", "majority", 3, "auto", 1)
    assert (s.io_threads, s.retry_attempts, s.degraded_after, s.allow_pickle) == (2, 5, 3, False)
    assert (s.retry_max_seconds, s.retry_backoff_seconds, s.retry_backoff_max_seconds) == (60.0, 0.2, 10.0)
    assert set(s.sources.values()) == {"default"}
    assert s.quorum == 1


def test_default_storage_is_resolved_at_call_time(tmp_path, monkeypatch):
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        monkeypatch.chdir(tmp_path / sub)
        with pytest.warns(RedundancyWarning):
            assert Settings.from_env({}).storage == (f"file://{tmp_path / sub}/.resilient/store",)


def test_no_warning_when_storage_is_configured():
    Settings.from_env({"RESILIENT_STORAGE": "memory://only"})  # the fixture turns the warning into an error
    Settings.from_env({}, storage=["/tmp/a", "/tmp/b"])


# (attribute, environment text, value it gives, keyword value, value it gives)
PRECEDENCE = [
    ("storage", "memory://x,memory://y", ("memory://x", "memory://y"), ["/k1", "/k2"], ("file:///k1", "file:///k2")),
    ("storage_options", '{"s3": {"anon": true}}', {"s3": {"anon": True}}, {"gs": {"token": "anon"}},
     {"gs": {"token": "anon"}}),
    ("redundancy", "PARITY", "parity", "replicate", "replicate"),
    ("write_quorum", "all", "all", 2, 2),
    ("keep", "7", 7, 5, 5),
    ("compression", " zstd ", "zstd", "off", "off"),
    ("compression_level", "-7", -7, 22, 22),
    ("io_threads", "64", 64, 1, 1),
    ("retry_attempts", "1", 1, 9, 9),
    ("retry_max_seconds", "1.5", 1.5, 2, 2.0),
    ("retry_backoff_seconds", "1e-3", 0.001, 0.5, 0.5),
    ("retry_backoff_max_seconds", "30", 30.0, 0.5, 0.5),
    ("degraded_after", "+4", 4, 1, 1),
    ("allow_pickle", "YES", True, True, True),
    ("batches_per_call", " AUTO ", "auto", 4, 4),
    ("batches_per_call", "64", 64, "auto", "auto"),
]


@pytest.mark.parametrize(("attr", "text", "from_text", "native", "from_native"), PRECEDENCE)
def test_keyword_beats_environment_beats_default(attr, text, from_text, native, from_native):
    field = config._BY_ATTR[attr]
    base = {"RESILIENT_STORAGE": "memory://1,memory://2,memory://3,memory://4"}
    environ = {**base, field.env: text}

    from_env = Settings.from_env(environ)
    assert getattr(from_env, attr) == from_text
    assert from_env.sources[attr] == "environment"

    from_kw = Settings.from_env(environ, **{attr: native})
    assert getattr(from_kw, attr) == from_native
    assert from_kw.sources[attr] == "keyword"

    if attr != "storage":
        default = Settings.from_env(base)
        assert getattr(default, attr) == field.default
        assert default.sources[attr] == "default"


def test_environ_defaults_to_os_environ_read_at_call_time(monkeypatch):
    monkeypatch.setenv("RESILIENT_STORAGE", "memory://a")
    monkeypatch.setenv("RESILIENT_KEEP", "7")
    assert Settings.from_env().keep == 7
    monkeypatch.setenv("RESILIENT_KEEP", "8")
    assert Settings.from_env().keep == 8
    monkeypatch.delenv("RESILIENT_KEEP")
    assert Settings.from_env().keep == 3


def test_allow_pickle_words():
    for word, expected in [("1", True), ("true", True), ("On", True), ("yes", True),
                           ("0", False), ("FALSE", False), ("off", False), ("no", False)]:
        assert Settings.from_env(env(allow_pickle=word)).allow_pickle is expected


# --- bad values, one by one -----------------------------------------------------------------------

BAD_TEXT = [
    ("RESILIENT_STORAGE", ""), ("RESILIENT_STORAGE", "memory://a,,memory://b"), ("RESILIENT_STORAGE", "memory://a,"),
    ("RESILIENT_STORAGE", "memory://a,memory://a"), ("RESILIENT_STORAGE", "/tmp/x,file:///tmp/x/"),
    ("RESILIENT_STORAGE", "s3://"), ("RESILIENT_STORAGE", "file://relative/path"),
    ("RESILIENT_STORAGE_OPTIONS", "[]"), ("RESILIENT_STORAGE_OPTIONS", '{"s3": 1}'),
    ("RESILIENT_STORAGE_OPTIONS", '{"not a protocol": {}}'), ("RESILIENT_STORAGE_OPTIONS", '"s3"'),
    ("RESILIENT_REDUNDANCY", "mirror"), ("RESILIENT_REDUNDANCY", ""),
    ("RESILIENT_WRITE_QUORUM", "0"), ("RESILIENT_WRITE_QUORUM", "-1"), ("RESILIENT_WRITE_QUORUM", "most"),
    ("RESILIENT_WRITE_QUORUM", "1.5"),
    ("RESILIENT_KEEP", "0"), ("RESILIENT_KEEP", "-3"), ("RESILIENT_KEEP", "three"), ("RESILIENT_KEEP", "2.0"),
    ("RESILIENT_KEEP", ""),
    ("RESILIENT_COMPRESSION", "gzip"), ("RESILIENT_COMPRESSION_LEVEL", "23"), ("RESILIENT_COMPRESSION_LEVEL", "-8"),
    ("RESILIENT_COMPRESSION_LEVEL", "fast"),
    ("RESILIENT_IO_THREADS", "0"), ("RESILIENT_IO_THREADS", "65"),
    ("RESILIENT_RETRY_ATTEMPTS", "0"), ("RESILIENT_RETRY_ATTEMPTS", "many"),
    ("RESILIENT_RETRY_MAX_SECONDS", "0"), ("RESILIENT_RETRY_MAX_SECONDS", "-1"), ("RESILIENT_RETRY_MAX_SECONDS", "nan"),
    ("RESILIENT_RETRY_MAX_SECONDS", "inf"), ("RESILIENT_RETRY_MAX_SECONDS", "1min"),
    ("RESILIENT_RETRY_BACKOFF_SECONDS", "0"), ("RESILIENT_RETRY_BACKOFF_MAX_SECONDS", "-0.5"),
    ("RESILIENT_DEGRADED_AFTER", "0"), ("RESILIENT_DEGRADED_AFTER", "x"),
    ("RESILIENT_ALLOW_PICKLE", "maybe"), ("RESILIENT_ALLOW_PICKLE", "2"), ("RESILIENT_ALLOW_PICKLE", ""),
    ("RESILIENT_BATCHES_PER_CALL", "0"), ("RESILIENT_BATCHES_PER_CALL", "65"), ("RESILIENT_BATCHES_PER_CALL", "2.5"),
    ("RESILIENT_BATCHES_PER_CALL", "automatic"),
]


@pytest.mark.parametrize(("variable", "text"), BAD_TEXT)
def test_bad_environment_value_names_variable_value_and_accepted(variable, text):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**env(), variable: text})
    err = info.value
    assert err.name == variable
    if variable != "RESILIENT_STORAGE_OPTIONS":
        assert err.value == text
    assert err.accepted == config._BY_ENV[variable].parser.accepted
    assert str(err).startswith(f"{variable}=")
    assert "expected" in str(err)


BAD_NATIVE = [
    ("storage", []), ("storage", ["/a", "/a"]), ("storage", ["memory://a", 3]), ("storage", 5), ("storage", [""]),
    ("storage_options", {"s3": "anon"}), ("storage_options", ["s3"]), ("storage_options", {"s3": {1: 2}}),
    ("redundancy", None), ("write_quorum", 0), ("write_quorum", True), ("write_quorum", 1.0),
    ("keep", 0), ("keep", True), ("keep", 2.5), ("keep", None),
    ("compression", 1), ("compression_level", 99), ("io_threads", 100),
    ("retry_attempts", 0), ("retry_max_seconds", 0), ("retry_max_seconds", float("inf")),
    ("retry_backoff_seconds", -1.0), ("retry_backoff_max_seconds", False),
    ("degraded_after", -1), ("allow_pickle", 1), ("allow_pickle", "sometimes"),
    ("batches_per_call", 0), ("batches_per_call", True), ("batches_per_call", 2.0), ("batches_per_call", "many"),
]


@pytest.mark.parametrize(("attr", "value"), BAD_NATIVE)
def test_bad_keyword_value_names_the_keyword(attr, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(), **{attr: value})
    assert info.value.name == f"keyword '{attr}'"
    assert str(info.value).startswith(f"keyword '{attr}'=")


@given(st.integers(min_value=-1000, max_value=1000))
def test_integer_fields_accept_exactly_their_range(n):
    for attr, lo, hi in [("keep", 1, None), ("compression_level", -7, 22), ("io_threads", 1, 64),
                         ("retry_attempts", 1, None), ("degraded_after", 1, None)]:
        ok = n >= lo and (hi is None or n <= hi)
        variable = config._BY_ATTR[attr].env
        for source in ({"environ": {**env(), variable: str(n)}}, {"environ": env(), attr: n}):
            if ok:
                assert getattr(Settings.from_env(**source), attr) == n
            else:
                with pytest.raises(ConfigError, match="out of range"):
                    Settings.from_env(**source)


@given(st.text(max_size=8).filter(lambda t: t.strip().lower() not in {
    "1", "0", "true", "false", "yes", "no", "on", "off"}))
def test_allow_pickle_refuses_any_other_word(text):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**env(), "RESILIENT_ALLOW_PICKLE": text})
    assert info.value.name == "RESILIENT_ALLOW_PICKLE"


# --- names ----------------------------------------------------------------------------------------


def test_unknown_resilient_variable_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**env(), "RESILIENT_KEPP": "5"})
    err = info.value
    assert err.name == "RESILIENT_KEPP"
    assert "did you mean RESILIENT_KEEP?" in str(err)
    assert all(f.env in err.accepted for f in FIELDS)
    assert "5" not in str(err).replace("RESILIENT_", "")  # the value of an unknown variable is not shown


def test_other_variables_are_ignored():
    s = Settings.from_env({**env(), "PATH": "/bin", "RESILIENTLY": "x", "resilient_keep": "9"})
    assert s.keep == 3


def test_unknown_keyword_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(), kep=5)
    assert info.value.name == "keyword 'kep'"
    assert "did you mean 'keep'?" in str(info.value)
    with pytest.raises(ConfigError, match="keyword 'sources'"):
        Settings.from_env(env(), sources={})


# --- storage URLs and options ---------------------------------------------------------------------


def test_storage_paths_become_absolute_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"RESILIENT_STORAGE": " rel/dir , /abs/dir/ ,file:///x/y,S3://Bucket/p/,gs://b"})
    assert s.storage == (f"file://{tmp_path}/rel/dir", "file:///abs/dir", "file:///x/y", "s3://Bucket/p", "gs://b")
    assert Settings.from_env({}, storage=[Path("/p/q"), "memory://m"]).storage == ("file:///p/q", "memory://m")
    assert Settings.from_env({}, storage="memory://a,memory://b").storage == ("memory://a", "memory://b")


def test_duplicate_storage_after_normalization_is_refused():
    with pytest.raises(ConfigError, match="duplicate entry file:///tmp/x") as info:
        Settings.from_env({"RESILIENT_STORAGE": "/tmp/x,file:///tmp/x/"})
    assert info.value.name == "RESILIENT_STORAGE"


def test_storage_options_for_merges_protocol_and_longest_prefix():
    s = Settings.from_env(env(), storage_options={
        "s3": {"anon": False, "client_kwargs": {"region_name": "eu-west-1", "verify": True}},
        "s3://bucket-a": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}},
        "s3://bucket-a/deep": {"anon": True},
        "gs": {"project": "p"},
    })
    assert s.storage_options_for("s3://bucket-a/run") == {
        "anon": False, "client_kwargs": {"region_name": "eu-west-1", "verify": True,
                                         "endpoint_url": "http://127.0.0.1:5000"}}
    assert s.storage_options_for("s3://bucket-a/deep/run") == {
        "anon": True, "client_kwargs": {"region_name": "eu-west-1", "verify": True}}
    assert s.storage_options_for("s3://bucket-ab/run") == {
        "anon": False, "client_kwargs": {"region_name": "eu-west-1", "verify": True}}
    assert s.storage_options_for("s3://KEY:SECRET@bucket-a")["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:5000"
    assert s.storage_options_for("gs://x") == {"project": "p"}
    assert s.storage_options_for("/local/path") == {}

    got = s.storage_options_for("s3://bucket-a/run")
    got["client_kwargs"]["region_name"] = "mutated"
    assert s.storage_options_for("s3://bucket-a/run")["client_kwargs"]["region_name"] == "eu-west-1"


def test_storage_options_json_lists_come_back_as_lists():
    s = Settings.from_env({**env(), "RESILIENT_STORAGE_OPTIONS": '{"s3": {"tags": ["a", "b"]}}'})
    assert s.storage_options_for("s3://b") == {"tags": ["a", "b"]}


def test_bad_storage_options_json_is_reported_without_the_text():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**env(), "RESILIENT_STORAGE_OPTIONS": '{"s3": {"secret": "' + SECRET + '"'})
    assert info.value.name == "RESILIENT_STORAGE_OPTIONS"
    assert info.value.value == "***"
    assert "invalid JSON" in str(info.value)
    assert SECRET not in str(info.value)


# --- cross-field rules ----------------------------------------------------------------------------


def test_write_quorum_above_the_number_of_urls_is_refused():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RESILIENT_STORAGE": "memory://a,memory://b", "RESILIENT_WRITE_QUORUM": "3"})
    assert info.value.name == "RESILIENT_WRITE_QUORUM"
    assert info.value.value == 3
    assert "RESILIENT_STORAGE lists 2 URLs" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RESILIENT_STORAGE": "memory://a"}, write_quorum=2)
    assert info.value.name == "keyword 'write_quorum'"
    assert "RESILIENT_STORAGE lists 1 URL" in str(info.value)


def test_parity_needs_three_urls():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RESILIENT_STORAGE": "memory://a,memory://b", "RESILIENT_REDUNDANCY": "parity"})
    assert info.value.name == "RESILIENT_REDUNDANCY"
    assert info.value.value == "parity"
    assert Settings.from_env({"RESILIENT_STORAGE": THREE, "RESILIENT_REDUNDANCY": "parity"}).quorum == 2


def test_parity_refuses_a_quorum_below_the_data_shards():
    four = {"RESILIENT_STORAGE": "memory://a,memory://b,memory://c,memory://d", "RESILIENT_REDUNDANCY": "parity"}
    with pytest.raises(ConfigError, match="parity needs its 3 data shards") as info:
        Settings.from_env({**four, "RESILIENT_WRITE_QUORUM": "2"})
    assert info.value.name == "RESILIENT_WRITE_QUORUM"
    assert Settings.from_env({**four, "RESILIENT_WRITE_QUORUM": "3"}).quorum == 3
    assert Settings.from_env(four).quorum == 3


@pytest.mark.parametrize(("n", "redundancy", "write_quorum", "expected"), [
    (1, "replicate", "majority", 1), (2, "replicate", "majority", 2), (3, "replicate", "majority", 2),
    (4, "replicate", "majority", 3), (5, "replicate", "majority", 3), (5, "replicate", "all", 5),
    (5, "replicate", "1", 1), (3, "parity", "majority", 2), (5, "parity", "majority", 4),
    (5, "parity", "all", 5), (5, "parity", "4", 4),
])
def test_quorum(n, redundancy, write_quorum, expected):
    storage = ",".join(f"memory://r{i}" for i in range(n))
    s = Settings.from_env({"RESILIENT_STORAGE": storage, "RESILIENT_REDUNDANCY": redundancy,
                           "RESILIENT_WRITE_QUORUM": write_quorum})
    assert s.quorum == expected


def test_backoff_max_below_backoff_is_refused():
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(retry_backoff_seconds="2", retry_backoff_max_seconds="1"))
    assert info.value.name == "RESILIENT_RETRY_BACKOFF_MAX_SECONDS"
    assert "RESILIENT_RETRY_BACKOFF_SECONDS (2)" in str(info.value)


# --- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://KEY:SECRET@bucket/p", "s3://***@bucket/p"),
    ("https://user@host:9000/x", "https://***@host:9000/x"),
    ("s3://bucket/p", "s3://bucket/p"),
    ("/plain/path@x", "/plain/path@x"),
    ("a s3://K:S@b and gs://T@c", "a s3://***@b and gs://***@c"),
    ("https://h/o?X-Amz-Credential=AK&X-Amz-Signature=ff&partNumber=2",
     "https://h/o?X-Amz-Credential=***&X-Amz-Signature=***&partNumber=2"),
    ("https://acct.blob.core.windows.net/c?sv=2020&sig=abc", "https://acct.blob.core.windows.net/c?sv=2020&sig=***"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~+", min_size=6))
def test_redact_url_never_leaks_a_password(password):
    assert password not in redact_url(f"s3://AKIA:{password}@bucket/run")


def test_secrets_are_masked_in_repr_describe_and_redacted():
    s = Settings.from_env({"RESILIENT_STORAGE": f"s3://AKIA:{SECRET}@bucket/run,memory://b"}, storage_options={
        "s3": {"key": "AKIA", "secret": SECRET, "client_kwargs": {"aws_secret_access_key": SECRET,
                                                                 "endpoint_url": "http://127.0.0.1:5000"}},
        "gs": {"token": SECRET, "Session_Token": SECRET, "password": SECRET, "credentials": {"x": SECRET}},
    })
    assert s.storage[0] == f"s3://AKIA:{SECRET}@bucket/run"  # the real value is kept for use
    assert s.storage_options_for("s3://bucket/run")["secret"] == SECRET
    for text in (repr(s), str(s), repr(s.describe()), repr(s.redacted())):
        assert SECRET not in text
        assert "AKIA" not in text
    red = s.redacted()
    assert red["storage"] == ("s3://***@bucket/run", "memory://b")
    assert red["storage_options"]["s3"]["client_kwargs"] == {"aws_secret_access_key": "***",
                                                              "endpoint_url": "http://127.0.0.1:5000"}
    assert red["storage_options"]["gs"] == {"token": "***", "Session_Token": "***", "password": "***",
                                            "credentials": "***"}
    assert described(s)["RESILIENT_STORAGE"] == "s3://***@bucket/run,memory://b"
    assert "s3://***@bucket/run" in repr(s)


@pytest.mark.parametrize("environ", [
    {"RESILIENT_STORAGE": f"s3://AKIA:{SECRET}@b,s3://AKIA:{SECRET}@b"},
    {"RESILIENT_STORAGE": f"s3://AKIA:{SECRET}@b,,memory://x"},
    {"RESILIENT_STORAGE": f"file://AKIA:{SECRET}@host/x"},
    {"RESILIENT_STORAGE": "memory://a", "RESILIENT_STORAGE_OPTIONS": '{"s3": {"secret": "%s"}, "x y": {}}' % SECRET},
    {"RESILIENT_STORAGE": "memory://a", "RESILIENT_STORAGE_OPTIONS": '{"s3": {"key": "AKIA", "secret": "%s"' % SECRET},
    {"RESILIENT_STORAGE": "memory://a", "RESILIENT_SECRET_KEY": SECRET},
])
def test_secrets_are_masked_in_errors(environ):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.value)


def test_secret_field_is_masked_everywhere(monkeypatch):
    token = dataclasses.replace(config._BY_ATTR["keep"], secret=True)
    monkeypatch.setattr(config, "FIELDS", tuple(token if f.attr == "keep" else f for f in FIELDS))
    s = Settings.from_env(env(keep="4"))
    assert s.keep == 4
    assert s.redacted()["keep"] == "***" and described(s)["RESILIENT_KEEP"] == "***"
    assert "keep='***'" in repr(s)
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(keep="s3cr3t"))
    assert info.value.value == "***" and "s3cr3t" not in str(info.value)


# --- copies, pickling, the table ------------------------------------------------------------------


def test_with_options_validates_and_records_keyword_sources():
    s = Settings.from_env(env(keep="4"))
    t = s.with_options(keep=6, storage=["memory://x"])
    assert (t.keep, t.storage, t.sources["keep"], t.sources["storage"], t.sources["io_threads"]) == (
        6, ("memory://x",), "keyword", "keyword", "default")
    assert (s.keep, s.sources["keep"]) == (4, "environment")
    with pytest.raises(ConfigError) as info:
        s.with_options(keep=0)
    assert info.value.name == "keyword 'keep'"
    with pytest.raises(ConfigError) as info:
        s.with_options(write_quorum=4)
    assert info.value.name == "keyword 'write_quorum'"
    with pytest.raises(ConfigError, match="keyword 'kepe'"):
        s.with_options(kepe=1)


def test_settings_are_frozen():
    s = Settings.from_env(env())
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.keep = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.storage_options["s3"] = {}  # type: ignore[index]


def test_constructor_validates_too():
    fields = {f.attr: f.default for f in FIELDS}
    assert Settings(**{**fields, "storage": ["/x"]}).storage == ("file:///x",)
    with pytest.raises(ConfigError) as info:
        Settings(**{**fields, "storage": ["/x"], "keep": 0})
    assert info.value.name == "keyword 'keep'"


def test_settings_pickle_round_trip():
    s = Settings.from_env(env(keep="4", storage_options='{"s3": {"anon": true, "tags": ["a"]}}'),
                          allow_pickle=True)
    t = pickle.loads(pickle.dumps(s))
    assert t == s
    assert hash(t) == hash(s)
    assert dict(t.sources) == dict(s.sources)
    assert t.describe() == s.describe()
    assert t.storage_options_for("s3://b") == {"anon": True, "tags": ["a"]}


def test_equality_ignores_sources():
    assert Settings.from_env(env(keep="5")) == Settings.from_env(env(), keep=5)
    assert Settings.from_env(env(keep="5")) != Settings.from_env(env(), keep=6)


def test_fields_table_matches_the_dataclass():
    attrs = [f.name for f in dataclasses.fields(Settings) if f.name != "sources"]
    assert [f.attr for f in FIELDS] == attrs
    assert [f.env for f in FIELDS] == [f"RESILIENT_{a.upper()}" for a in attrs]
    for f in FIELDS:  # every default and example is itself accepted
        Settings.from_env({**env(), f.env: f.example})
        if f.attr != "storage":
            assert f.parser.parse(f.default) == f.default


def test_reference_table_has_one_row_per_field():
    lines = reference_table().splitlines()
    assert lines[0] == "| Variable | Meaning | Type | Default | Example |"
    assert len(lines) == 2 + len(FIELDS)
    assert lines[2 + 4] == "| `RESILIENT_KEEP` | checkpoint generations retained per key | integer >= 1 | `3` | `5` |"
    assert [len(re.findall(r"(?<!\\)\|", line)) for line in lines] == [6] * len(lines)  # 5 cells each


def test_module_surface_and_docstring_examples():
    assert config.__all__ == sorted(config.__all__)
    assert issubclass(RedundancyWarning, UserWarning)
    result = doctest.testmod(config)
    assert result.attempted > 10 and result.failed == 0


def test_import_reads_no_environment():
    code = (
        "import os\n"
        "real = dict(os.environ)\n"
        "class Boom(dict):\n"
        "    def _check(self, k):\n"
        "        if str(k).startswith('RESILIENT'): raise AssertionError('environment read at import: ' + k)\n"
        "    def __getitem__(self, k): self._check(k); return real[k]\n"
        "    def get(self, k, d=None): self._check(k); return real.get(k, d)\n"
        "    def __contains__(self, k): self._check(k); return k in real\n"
        "os.environ = Boom(real)\n"
        "os.environ['RESILIENT_KEEP'] = 'not-a-number'\n"
        "import resilient, resilient.config, resilient.retry\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
