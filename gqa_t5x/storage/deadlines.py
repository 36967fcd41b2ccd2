"""Bounded waits on object storage: one timeout and retry policy for gs://.

Without a bound, a GCS endpoint that accepts connections and never answers
(or an address that silently drops them) makes a command wait for as long as
the clients and the operating system keep a socket open: many minutes, with
nothing printed. This module holds the bound and the ways to enforce it:

* `Policy` (`Policy.from_environment()` reads it on each call): how long
  storage may take to answer (GQA_T5X_STORAGE_TIMEOUT_S, default 120 s), how
  often a transient failure is retried (GQA_T5X_STORAGE_RETRIES, default 3)
  and the first wait between tries (GQA_T5X_STORAGE_BACKOFF_S, default 1 s,
  doubled at each retry up to 30 s).
* `bounded(call, url=..., what=...)`: runs a blocking gs:// call in a daemon
  thread and gives up at the timeout with `StorageTimeoutError`, whose
  message is the one line a command prints; transient errors (connection
  refused or reset, HTTP 408/429/5xx) are retried within the same timeout.
* `check_reachable(url)`: one small request to the endpoint that serves a
  gs:// URL, once per process, endpoint and bucket. The path layer and the
  checkpoint registry call it before their first access, so a stalled or
  unreachable endpoint is reported within the timeout even where the wait
  would be inside Orbax, tensorstore or TensorFlow; a bucket that refuses
  anonymous access while no credentials are set up says how to log in.
* `client_environment`, `gcsfs_options`, `tensorstore_retries`: the same
  bounds in the clients' own settings (tf.io.gfile, tensorstore, gcsfs),
  applied by `paths.configure_clients` (see docs/training.md, "Storage").

Local paths never come here: they pay for no thread and no request.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from gqa_t5x.errors import ExplainedFailure

T = TypeVar("T")

TIMEOUT_VAR = "GQA_T5X_STORAGE_TIMEOUT_S"
RETRIES_VAR = "GQA_T5X_STORAGE_RETRIES"
BACKOFF_VAR = "GQA_T5X_STORAGE_BACKOFF_S"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0

EMULATOR_HOST_VAR = "STORAGE_EMULATOR_HOST"
GCS_ENDPOINT = "https://storage.googleapis.com"
LOGIN_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
    "to a service-account key file"
)

_GCS_URL = re.compile(r"^gs://([^/]+)", re.IGNORECASE)
# A Google Cloud VM's SMBIOS product name (google-auth's check; Linux).
_GCE_PRODUCT_FILE = "/sys/class/dmi/id/product_name"
# HTTP statuses worth another try (GCS's retry guidance).
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Exception classes (by name, anywhere in the class hierarchy, so that no
# client library has to be imported here) of transient failures...
_TRANSIENT_NAMES = frozenset({
    "ConnectionError",  # builtin (refused, reset, aborted) and requests'
    "ClientConnectionError",  # aiohttp (gcsfs)
    "ClientPayloadError",
    "ChunkedEncodingError",  # requests (google-cloud-storage)
    "IncompleteRead",
    "RemoteDisconnected",
    "gaierror",  # name resolution
    "ServiceUnavailable", "TooManyRequests", "InternalServerError", "BadGateway",
    "GatewayTimeout",  # google.api_core
    "UnavailableError",  # TensorFlow
})
# ...and of a client's own timeout.
_TIMEOUT_NAMES = frozenset({"Timeout", "ReadTimeout", "ConnectTimeout", "DeadlineExceeded",
                            "DeadlineExceededError"})


class StorageError(OSError, ExplainedFailure):
    """Object storage could not be used; the message is one line naming the URL.

    An `ExplainedFailure`: the command prints that line alone (exit status 1).
    """


class StorageTimeoutError(StorageError, TimeoutError):
    """Object storage did not answer within the policy's timeout."""


class StorageUnreachableError(StorageError, ConnectionError):
    """Object storage kept failing with transient errors (e.g. connection refused)."""


class StorageCredentialsError(StorageError, PermissionError):
    """No credentials are set up and the bucket refuses anonymous access."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """How long gs:// operations may wait, and how they are retried.

    Attributes:
      timeout_s: The longest wait for storage to answer: one call of the path
        layer or one probe as a whole (its retries included), and one request
        of the underlying clients.
      retries: How many times a transient failure is retried.
      backoff_s: The wait before the first retry; doubled at each further
        one, up to `MAX_BACKOFF_S`.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a positive number of seconds.")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r} must be a whole number >= 0.")
        if not (math.isfinite(self.backoff_s) and self.backoff_s >= 0):
            raise ValueError(f"backoff_s={self.backoff_s!r} must be a number of seconds >= 0.")

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (0 = the first retry)."""
        return min(self.backoff_s * 2.0 ** retry, max(MAX_BACKOFF_S, self.backoff_s))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Policy:
        """The policy the environment sets (defaults where a variable is unset).

        Args:
          environ: The variables to read (default: `os.environ`).

        Returns:
          The `Policy`.

        Raises:
          ValueError: a variable is not a valid number; the message names it
            and says what to set.
        """
        env = os.environ if environ is None else environ
        return cls(
            timeout_s=_read(env, TIMEOUT_VAR, DEFAULT_TIMEOUT_S, integer=False, minimum=0, strict=True),
            retries=int(_read(env, RETRIES_VAR, DEFAULT_RETRIES, integer=True, minimum=0, strict=False)),
            backoff_s=_read(env, BACKOFF_VAR, DEFAULT_BACKOFF_S, integer=False, minimum=0, strict=False),
        )


def _read(environ: Mapping[str, str], name: str, default: float, *, integer: bool, minimum: float,
          strict: bool) -> float:
    """One variable of the policy: `default` when unset, else a checked number."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    kind = "a whole number" if integer else "a number of seconds"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not {kind}; set it to e.g. {default:g}, or unset it "
                         f"for the default ({default:g}).") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name}={text!r} must be {kind} {bound}; set it to e.g. {default:g}, or "
                         f"unset it for the default ({default:g}).")
    return value


# ------------------------------------------------------------------ endpoints
def is_gcs(path: Any) -> bool:
    """True for a gs:// URL (str or path object)."""
    return _GCS_URL.match(os.fspath(path)) is not None


def bucket_of(url: str) -> str:
    """The bucket of a gs:// URL ('gs://b/x' -> 'b').

    Raises:
      ValueError: `url` is not a gs:// URL.
    """
    match = _GCS_URL.match(url)
    if match is None:
        raise ValueError(f"Not a gs:// URL: {url!r}.")
    return match.group(1)


def emulator_url() -> str | None:
    """The emulator named by STORAGE_EMULATOR_HOST as a URL, or None for real GCS.

    A bare 'host:port' means http://host:port, as gcsfs and
    google-cloud-storage read it.
    """
    host = os.environ.get(EMULATOR_HOST_VAR, "").strip()
    if host in ("", "default"):
        return None
    return (host if "://" in host else f"http://{host}").rstrip("/")


def endpoint() -> str:
    """The endpoint serving gs:// URLs: the emulator, else storage.googleapis.com."""
    return emulator_url() or GCS_ENDPOINT


def credentials_found() -> bool:
    """Whether Google credentials are set up, judged without any request.

    True with GOOGLE_APPLICATION_CREDENTIALS, a token for tests
    (GOOGLE_AUTH_TOKEN_FOR_TESTING), gcloud's application-default credentials
    file, a metadata server named by GCE_METADATA_HOST / GCE_METADATA_IP, or
    on a Google Cloud VM (its SMBIOS product name, as google-auth checks).
    """
    env = os.environ
    if any(env.get(name) for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                                      "GCE_METADATA_HOST", "GCE_METADATA_IP")):
        return True
    config = env.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    if os.path.isfile(os.path.join(config, "application_default_credentials.json")):
        return True
    try:
        with open(_GCE_PRODUCT_FILE) as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


# ------------------------------------------------------------------- messages
def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.0f}"


def timeout_message(url: str, what: str, timeout_s: float) -> str:
    """The one line of a `StorageTimeoutError`."""
    return (f"{url}: storage did not answer within {_seconds(timeout_s)} s ({what}; endpoint "
            f"{endpoint()}); set {TIMEOUT_VAR} to wait longer")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def unreachable_message(url: str, what: str, tries: int, elapsed_s: float, error: BaseException) -> str:
    """The one line of a `StorageUnreachableError`."""
    return (f"{url}: storage failed {tries} time(s) in {_seconds(elapsed_s)} s ({what}; endpoint "
            f"{endpoint()}): {_first_line(error)}; check the endpoint and the network, or set "
            f"{RETRIES_VAR} to try more often")


def is_timeout(error: BaseException) -> bool:
    """Whether `error` is a client's own timeout (socket, asyncio, requests, TF)."""
    if isinstance(error, TimeoutError):
        return True
    return any(cls.__name__ in _TIMEOUT_NAMES for cls in type(error).__mro__)


def is_transient(error: BaseException) -> bool:
    """Whether `error` is worth another try: a lost connection, HTTP 408/429/5xx."""
    if isinstance(error, StorageError):
        return False
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__):
        return True
    for attribute in ("code", "status", "status_code"):
        value = getattr(error, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value in _TRANSIENT_STATUS:
            return True
    return False


# --------------------------------------------------------------- the deadline
class _Expired(Exception):
    """The call did not return before the deadline."""


def _within(call: Callable[[], T], seconds: float, what: str) -> T:
    """Runs `call` in a daemon thread; raises `_Expired` after `seconds`.

    A call that does not return is left running in its thread (Python cannot
    stop a thread blocked in a socket); the commands end the process on an
    error, and a library caller gets the exception at once all the same.
    """
    if seconds <= 0:
        raise _Expired
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, name=f"gqa-t5x storage ({what})", daemon=True).start()
    if not done.wait(seconds):
        raise _Expired
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def bounded(call: Callable[[], T], *, url: str, what: str, policy: Policy | None = None,
            retry: bool = True) -> T:
    """Runs a blocking object-storage call with a deadline and retries.

    Args:
      call: The call (no arguments); it runs in a daemon thread.
      url: The gs:// URL it works on, named in errors.
      what: What it does, for errors ('listing a directory').
      policy: The bounds (default: `Policy.from_environment()`).
      retry: Retry transient errors; False for calls that must not repeat
        (their transient error is still reported as `StorageUnreachableError`).

    Returns:
      What `call` returns.

    Raises:
      StorageTimeoutError: no answer within `policy.timeout_s` (the whole
        call, retries and their waits included), or the client's own timeout.
      StorageUnreachableError: transient errors on every try (or on the one
        try, without `retry`).
      Exception: any other error of `call`, unchanged (e.g. FileNotFoundError).
    """
    policy = policy or Policy.from_environment()
    start = time.monotonic()
    deadline = start + policy.timeout_s
    tries = 0
    while True:
        tries += 1
        try:
            return _within(call, deadline - time.monotonic(), what)
        except _Expired:
            raise StorageTimeoutError(timeout_message(url, what, policy.timeout_s)) from None
        except StorageError:
            raise
        except Exception as error:
            if is_timeout(error):
                raise StorageTimeoutError(timeout_message(url, what, policy.timeout_s)) from error
            if not is_transient(error):
                raise
            wait = policy.delay(tries - 1)
            if not retry or tries > policy.retries or time.monotonic() + wait >= deadline:
                elapsed = time.monotonic() - start
                raise StorageUnreachableError(unreachable_message(url, what, tries, elapsed, error)) from error
            time.sleep(wait)


# ---------------------------------------------------------------- the probe
_reached: set[tuple[str, str]] = set()
_reached_lock = threading.Lock()


def _status(request_url: str, timeout_s: float, *, use_proxies: bool) -> int:
    """The HTTP status of a GET (an error status is an answer too).

    Raises:
      OSError: no answer (the socket error: refused, reset, timed out, ...).
    """
    handlers = [] if use_proxies else [urllib.request.ProxyHandler({})]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(request_url, method="GET"), timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code
    except urllib.error.URLError as error:
        if isinstance(error.reason, OSError) and not isinstance(error.reason, ssl.SSLError):
            raise error.reason from None
        return 0  # a TLS or proxy answer: something is there; the clients report the rest


def check_reachable(url: Any, *, policy: Policy | None = None) -> None:
    """Checks, once per process, endpoint and bucket, that storage answers.

    One GET of the bucket's first object name at the endpoint serving `url`
    (the emulator of STORAGE_EMULATOR_HOST, else storage.googleapis.com
    through the environment's proxies). Any HTTP answer counts; a local path
    or another scheme returns at once.

    Args:
      url: A gs:// URL (str or path object); anything else is ignored.
      policy: The bounds (default: from the environment).

    Raises:
      StorageTimeoutError: no answer within the timeout.
      StorageUnreachableError: connection failures on every try.
      StorageCredentialsError: real GCS refused anonymous access (HTTP 401
        or 403) and no credentials are set up; the message says how to log in.
      ValueError: a GQA_T5X_STORAGE_* variable is invalid.
    """
    text = os.fspath(url)
    if not is_gcs(text):
        return
    bucket = bucket_of(text)
    emulated = emulator_url() is not None
    key = (endpoint(), bucket)
    with _reached_lock:
        if key in _reached:
            return
    policy = policy or Policy.from_environment()
    request_url = f"{key[0]}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?maxResults=1"
    status = bounded(lambda: _status(request_url, policy.timeout_s, use_proxies=not emulated),
                     url=text, what="reaching the bucket", policy=policy)
    if status in (401, 403) and not emulated and not credentials_found():
        raise StorageCredentialsError(
            f"{text}: no Google Cloud credentials found, and {key[0]} refused anonymous access "
            f"(HTTP {status}); {LOGIN_HINT}"
        )
    with _reached_lock:
        _reached.add(key)


def forget_probes() -> None:
    """Forgets which endpoints answered (the next `check_reachable` asks again)."""
    with _reached_lock:
        _reached.clear()


# ----------------------------------------------------- the clients' settings
def client_environment(policy: Policy) -> dict[str, str]:
    """The clients' environment variables that carry `policy`.

    tf.io.gfile (epath's gs:// client when TensorFlow is installed; data,
    vocabularies and summaries): connection and idle timeouts, metadata
    requests (listings, stats) as a whole, and its retries. tensorstore
    (array data): connection timeout, and a transfer that moves less than 1
    byte/s for the timeout fails. Both read them once, at their first gs://
    access.
    """
    seconds = str(max(1, math.ceil(policy.timeout_s)))
    return {
        "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": seconds,
        "GCS_REQUEST_IDLE_TIMEOUT_SECS": seconds,
        "GCS_METADATA_REQUEST_TIMEOUT_SECS": seconds,
        "GCS_RETRY_CONFIG_MAX_RETRIES": str(policy.retries),
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": str(round(policy.backoff_s * 1e6)),
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": str(round(max(MAX_BACKOFF_S, policy.backoff_s) * 1e6)),
        "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": seconds,
        "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": seconds,
        "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1",
    }


def gcsfs_options(policy: Policy) -> dict[str, Any]:
    """gcsfs options (fsspec's 'gcs' defaults) that carry `policy`.

    `requests_timeout`: each HTTP request must complete within the timeout
    (gcsfs's default is no limit at all). gcsfs retries failed requests
    itself, a fixed 6 tries; a request that times out is not retried.
    """
    return {"requests_timeout": float(policy.timeout_s)}


def tensorstore_retries(policy: Policy) -> dict[str, Any]:
    """tensorstore's `gcs_request_retries` context resource for `policy`.

    Its `max_retries` counts attempts, hence one more than the retries.
    """
    return {
        "max_retries": policy.retries + 1,
        "initial_delay": f"{policy.backoff_s:g}s",
        "max_delay": f"{max(MAX_BACKOFF_S, policy.backoff_s):g}s",
    }
