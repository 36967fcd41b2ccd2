"""Bounded waits on gs:// (`gqa_t5x.storage.deadlines`): no silent hang.

The policy is read from GQA_T5X_STORAGE_TIMEOUT_S / _RETRIES / _BACKOFF_S
(bad values name the variable); a call that blocks past the timeout raises
`StorageTimeoutError` naming the URL, on time; transient errors are retried
as configured and others are not; local paths never pay for a thread. Against
loopback servers started here (one that accepts connections and never
answers, one that answers with a chosen HTTP status), the probe reports a
stall, a refused connection and missing credentials in one line; and the
commands (`gqa-t5x convert` / `export`, training with a gs:// MODEL_DIR)
started with STORAGE_EMULATOR_HOST at the silent server end with that line
and a non-zero status within the timeout plus start-up time.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from gqa_t5x import cli
from gqa_t5x.storage import deadlines, paths
from paths import REPO

URL = "gs://bucket/run/checkpoint_5"
# A subprocess imports JAX, TensorFlow and seqio before its first gs:// access.
STARTUP_SLACK_S = 90


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:  # timeout: look at the stop flag again
                continue
            self.connections.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self.connections:
            connection.close()
        self._socket.close()


class StatusServer:
    """Answers every request with one HTTP status and counts the requests."""

    def __init__(self, status: int) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.requests: list[str] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def storage_env(monkeypatch):
    """A clean storage environment: no policy variables, no probe remembered,
    no proxies (the probe's requests go to loopback servers only)."""
    for key in (deadlines.TIMEOUT_VAR, deadlines.RETRIES_VAR, deadlines.BACKOFF_VAR,
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(deadlines, "_reached", set())
    return monkeypatch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ policy
def test_policy_defaults_environment_and_backoff():
    assert deadlines.Policy.from_environment({}) == deadlines.Policy(timeout_s=120.0, retries=3, backoff_s=1.0)
    env = {deadlines.TIMEOUT_VAR: " 2.5 ", deadlines.RETRIES_VAR: "0", deadlines.BACKOFF_VAR: "0.25"}
    assert deadlines.Policy.from_environment(env) == deadlines.Policy(timeout_s=2.5, retries=0, backoff_s=0.25)
    assert deadlines.Policy.from_environment({deadlines.TIMEOUT_VAR: ""}).timeout_s == 120.0  # empty = unset
    assert [deadlines.Policy().delay(i) for i in range(7)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize("name,value,needle", [
    (deadlines.TIMEOUT_VAR, "two minutes", "is not a number of seconds"),
    (deadlines.TIMEOUT_VAR, "0", "must be a number of seconds > 0"),
    (deadlines.TIMEOUT_VAR, "-5", "must be a number of seconds > 0"),
    (deadlines.TIMEOUT_VAR, "inf", "must be a number of seconds > 0"),
    (deadlines.TIMEOUT_VAR, "nan", "must be a number of seconds > 0"),
    (deadlines.RETRIES_VAR, "1.5", "is not a whole number"),
    (deadlines.RETRIES_VAR, "-1", "must be a whole number >= 0"),
    (deadlines.BACKOFF_VAR, "-0.5", "must be a number of seconds >= 0"),
])
def test_a_bad_value_names_the_variable_and_what_to_set(name, value, needle):
    with pytest.raises(ValueError) as info:
        deadlines.Policy.from_environment({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}={value!r}") and needle in message and "unset it" in message
    assert "\n" not in message


def test_a_bad_value_in_the_environment_is_a_one_line_usage_error_of_the_command(storage_env, tmp_path, capsys):
    storage_env.setenv(deadlines.TIMEOUT_VAR, "soon")
    code = cli.main(["convert", "--source", URL, "--output", str(tmp_path / "out"), "--num_kv_heads", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"gqa-t5x convert: error: {deadlines.TIMEOUT_VAR}='soon' is not a number of seconds; "
                      f"set it to e.g. 120, or unset it for the default (120).")


# ---------------------------------------------------------- the deadline
def test_a_call_blocking_past_the_deadline_raises_naming_the_url_on_time(storage_env):
    release = threading.Event()
    policy = deadlines.Policy(timeout_s=0.5, retries=3, backoff_s=0.01)
    start = time.monotonic()
    try:
        with pytest.raises(deadlines.StorageTimeoutError) as info:
            deadlines.bounded(release.wait, url=URL, what="listing a directory", policy=policy)
    finally:
        release.set()  # lets the abandoned thread end
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.5, elapsed
    assert str(info.value) == (
        f"{URL}: storage did not answer within 0.5 s (listing a directory; endpoint "
        f"{deadlines.endpoint()}); set GQA_T5X_STORAGE_TIMEOUT_S to wait longer"
    )
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, OSError)


class _Unavailable(Exception):
    code = 503  # as gcsfs's HttpError carries it


@pytest.mark.parametrize("transient", [ConnectionResetError("reset"), _Unavailable("busy")])
def test_transient_errors_are_retried_the_configured_number_of_times(transient):
    calls = []

    def flaky(failures: int):
        def call():
            calls.append(time.monotonic())
            if len(calls) <= failures:
                raise transient
            return "answer"
        return call

    policy = deadlines.Policy(timeout_s=10, retries=2, backoff_s=0.05)
    assert deadlines.bounded(flaky(2), url=URL, what="writing a file", policy=policy) == "answer"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # backoff doubles

    calls.clear()
    with pytest.raises(deadlines.StorageUnreachableError) as info:
        deadlines.bounded(flaky(5), url=URL, what="writing a file", policy=policy)
    assert len(calls) == 3  # the first try and 2 retries
    message = str(info.value)
    assert message.startswith(f"{URL}: storage failed 3 time(s) in ") and "(writing a file; endpoint" in message
    assert message.endswith("set GQA_T5X_STORAGE_RETRIES to try more often")
    assert info.value.__cause__ is transient

    calls.clear()
    with pytest.raises(deadlines.StorageUnreachableError):
        deadlines.bounded(flaky(5), url=URL, what="publishing a file", policy=policy, retry=False)
    assert len(calls) == 1


def test_other_errors_are_not_retried_and_a_clients_timeout_is_a_storage_timeout():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gs://bucket/run/x")

    policy = deadlines.Policy(timeout_s=10, retries=3, backoff_s=0.01)
    with pytest.raises(FileNotFoundError, match="gs://bucket/run/x"):
        deadlines.bounded(missing, url=URL, what="checking a path", policy=policy)
    assert calls == [1]

    def client_timeout():
        calls.append(2)
        raise TimeoutError  # e.g. aiohttp's request timeout, fsspec's FSTimeoutError

    with pytest.raises(deadlines.StorageTimeoutError, match="did not answer within 10 s .checking a path"):
        deadlines.bounded(client_timeout, url=URL, what="checking a path", policy=policy)
    assert calls == [1, 2]


def test_local_paths_pay_for_no_thread_and_no_probe(tmp_path, monkeypatch):
    def no_thread(*args, **kwargs):
        raise AssertionError("a local path started a thread")

    monkeypatch.setattr(deadlines, "_within", no_thread)
    monkeypatch.setattr(deadlines, "_status", no_thread)
    paths.makedirs(tmp_path / "a" / "b")
    paths.write_file(tmp_path / "a" / "b" / "x.txt", "x")
    paths.replace_file(tmp_path / "a" / "y.txt", "y")
    with paths.replacing(tmp_path / "a" / "z.txt") as f:
        f.write("z")
    assert paths.listdir(tmp_path / "a") == ["b", "y.txt", "z.txt"]
    assert sorted(sorted(files) for _, _, files in paths.walk(tmp_path)) == [[], ["x.txt"], ["y.txt", "z.txt"]]
    paths.rmtree(tmp_path / "a")
    assert paths.listdir(tmp_path) == []
    paths.check_reachable(tmp_path)  # not gs://: nothing to check


# ---------------------------------------------------------------- the probe
def test_the_probe_reports_a_silent_endpoint_within_the_timeout(storage_env, silent):
    storage_env.setenv("STORAGE_EMULATOR_HOST", silent.url)
    storage_env.setenv(deadlines.TIMEOUT_VAR, "1")
    start = time.monotonic()
    with pytest.raises(deadlines.StorageTimeoutError) as info:
        paths.makedirs(URL)  # a run writing to gs:// checks the bucket first
    assert 1 <= time.monotonic() - start < 2.5
    assert str(info.value) == (f"{URL}: storage did not answer within 1 s (reaching the bucket; endpoint "
                               f"{silent.url}); set GQA_T5X_STORAGE_TIMEOUT_S to wait longer")
    assert silent.connections  # it did try


def test_the_probe_reports_a_refused_connection_after_the_retries(storage_env):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    storage_env.setenv("STORAGE_EMULATOR_HOST", endpoint)
    storage_env.setenv(deadlines.RETRIES_VAR, "2")
    storage_env.setenv(deadlines.BACKOFF_VAR, "0.05")
    with pytest.raises(deadlines.StorageUnreachableError) as info:
        paths.check_reachable(URL)
    message = str(info.value)
    assert message.startswith(f"{URL}: storage failed 3 time(s) in ")
    assert f"(reaching the bucket; endpoint {endpoint}): ConnectionRefusedError" in message


def test_the_probe_asks_once_per_bucket_and_endpoint(storage_env):
    server = StatusServer(200)
    try:
        storage_env.setenv("STORAGE_EMULATOR_HOST", server.url)
        paths.check_reachable(URL)
        paths.check_reachable("gs://bucket/other/path")
        assert server.requests == ["/storage/v1/b/bucket/o?maxResults=1"]
        paths.check_reachable("gs://another-bucket/x")
        assert len(server.requests) == 2
        deadlines.forget_probes()  # e.g. after the endpoint was restarted
        paths.check_reachable(URL)
        assert len(server.requests) == 3
    finally:
        server.close()


@pytest.fixture
def no_credentials(storage_env, tmp_path):
    """Real GCS (no emulator) served by a loopback server, no credentials anywhere."""
    for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                "GCE_METADATA_HOST", "GCE_METADATA_IP"):
        storage_env.delenv(key, raising=False)
    storage_env.setenv("HOME", str(tmp_path))
    storage_env.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    storage_env.setattr(deadlines, "_GCE_PRODUCT_FILE", str(tmp_path / "not_a_google_vm"))
    server = StatusServer(401)
    storage_env.setattr(deadlines, "GCS_ENDPOINT", server.url)
    yield storage_env
    server.close()


def test_missing_credentials_say_how_to_authenticate_in_one_line(no_credentials, tmp_path, capsys):
    assert not deadlines.credentials_found()
    code = cli.main(["convert", "--source", URL, "--output", str(tmp_path / "out"), "--num_kv_heads", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"gqa-t5x convert: error: {URL}: no Google Cloud credentials found")
    assert "gcloud auth application-default login" in err[0] and "GOOGLE_APPLICATION_CREDENTIALS" in err[0]
    assert not (tmp_path / "out").exists()


def test_with_credentials_any_answer_means_reachable(no_credentials, tmp_path):
    (tmp_path / "gcloud").mkdir()
    (tmp_path / "gcloud" / "application_default_credentials.json").write_text("{}")
    assert deadlines.credentials_found()
    paths.check_reachable(URL)  # 401 to an anonymous probe: the clients authenticate


# ------------------------------------------------------- bounded path layer
def test_a_stall_after_the_probe_still_ends_on_time(storage_env, silent):
    """gcsfs behind the path layer: the probe passed, then storage stalls."""
    import fsspec
    from etils.epath import gpath

    storage_env.setenv("STORAGE_EMULATOR_HOST", silent.url)
    storage_env.setenv("EPATH_USE_TF", "false")
    storage_env.setenv(deadlines.TIMEOUT_VAR, "1")
    # gcsfs's own timeout far beyond the bound below: only our 1 s deadline can end the calls in time.
    storage_env.setitem(fsspec.config.conf, "gcs", {"token": "anon", "requests_timeout": 30.0})
    gpath._is_tf_installed.cache_clear()
    deadlines._reached.add((silent.url, "bucket"))  # as after a probe that passed
    try:
        for call, what in [(lambda: paths.listdir(URL), "listing a directory"),
                           (lambda: paths.write_file(f"{URL}/x.json", "{}"), "writing a file")]:
            start = time.monotonic()
            with pytest.raises(deadlines.StorageTimeoutError, match=f"within 1 s \\({what}; endpoint {silent.url}\\)"):
                call()
            assert time.monotonic() - start < 10  # 1 s deadline; 2.65 s seen beside the other worker
    finally:
        gpath._is_tf_installed.cache_clear()


# ------------------------------------------------------------- the commands
def _run_against(silent: SilentServer, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                        deadlines.RETRIES_VAR, deadlines.BACKOFF_VAR)}
    env.update(STORAGE_EMULATOR_HOST=silent.url, GQA_T5X_STORAGE_TIMEOUT_S="5", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=5 + STARTUP_SLACK_S + 60)
    return result, time.monotonic() - start


def _assert_stall_reported(result: subprocess.CompletedProcess, elapsed: float, prog: str, url: str,
                           endpoint: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert 5 <= elapsed < 5 + STARTUP_SLACK_S, elapsed
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert lines == [
        f"{prog}: failed: {url}: storage did not answer within 5 s (reaching the "
        f"bucket; endpoint {endpoint}); set GQA_T5X_STORAGE_TIMEOUT_S to wait longer",
    ], result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "export"])
def test_convert_and_export_from_a_silent_endpoint_fail_in_one_line_within_the_bound(silent, tmp_path, command):
    source = "gs://bucket/mha/checkpoint_1000"
    if command == "convert":
        argv = ["gqa_t5x.cli", "convert", "--source", source, "--output", str(tmp_path / "out"),
                "--num_kv_heads", "2", "--no_progress"]
    else:
        argv = ["gqa_t5x.cli", "export", "--checkpoint", source, "--format", "huggingface",
                "--output", str(tmp_path / "out"), "--no_progress"]
    result, elapsed = _run_against(silent, *argv)
    _assert_stall_reported(result, elapsed, f"gqa-t5x {command}", source, silent.url)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_into_a_silent_gs_model_dir_fails_in_one_line_within_the_bound(silent):
    model_dir = "gs://bucket/gqa2_uptrain"
    result, elapsed = _run_against(
        silent, "gqa_t5x.main", "--gin_file=gin/models/t5_1_1/tiny.gin", "--gin_file=gin/runs/uptrain.gin",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.INITIAL_CHECKPOINT_PATH='/nowhere'", "--gin.TRAIN_STEPS=10",
        "--run_mode=train",
    )
    _assert_stall_reported(result, elapsed, "python -m gqa_t5x.main", model_dir, silent.url)
