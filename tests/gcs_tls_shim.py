"""An HTTPS proxy that lets TensorFlow's gs:// client reach the GCS emulator.

TensorFlow's GCS filesystem (tf.io.gfile, tf.data, seqio, TensorBoard
summaries) talks only to https://www.googleapis.com and
https://storage.googleapis.com and honours no emulator variable. It does
honour libcurl's `https_proxy` and `CURL_CA_BUNDLE`, so the tests point those
at this proxy and at a test CA: the proxy accepts `CONNECT`, terminates TLS
with a certificate for the two Google host names (signed by the test CA) and
forwards each request as plain HTTP to the emulator on loopback.

The emulator (Go's net/http) rejects two things libcurl sends, so they are
normalised here: a `Transfer-Encoding: identity` header, and chunked request
bodies (forwarded with a Content-Length). A resumable upload's `Location`
header is rewritten to https so libcurl keeps the upload on the tunnel.

Usage: python gcs_tls_shim.py EMULATOR_PORT CERT_FILE KEY_FILE
It listens on a free loopback port and prints that port on its first line.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import ssl
import sys

# Headers that describe one hop of a connection; never forwarded as they are.
_HOP_BY_HOP = {"transfer-encoding", "connection", "keep-alive", "proxy-connection", "content-length"}


def _read_chunked(stream) -> bytes:
    """Reads a chunked request body (and its trailers) from `stream`."""
    body = bytearray()
    while (size := int(stream.readline().split(b";")[0], 16)) > 0:
        body += stream.read(size)
        stream.readline()
    while stream.readline() not in (b"\r\n", b"\n", b""):
        pass
    return bytes(body)


def make_handler(upstream_port: int, tls: ssl.SSLContext) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler class forwarding to the emulator on `upstream_port`.

    Args:
      upstream_port: loopback port of the emulator (plain HTTP).
      tls: server context holding the googleapis.com certificate.

    Returns:
      A handler class for `http.server.ThreadingHTTPServer`.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            del args

        def setup(self) -> None:
            # Small request/response pairs: Nagle + delayed ACK would add 40 ms each.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().setup()

        def do_CONNECT(self) -> None:
            self.send_response(200, "Connection established")
            self.end_headers()
            Handler(tls.wrap_socket(self.connection, server_side=True), self.client_address, self.server)
            self.close_connection = True

        def _forward(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                body = _read_chunked(self.rfile)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() == "location":
                    value = value.replace("http://", "https://", 1)
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    return Handler


def main(argv: list[str]) -> None:
    """Serves until killed; prints the listening port first."""
    upstream_port, cert, key = int(argv[0]), argv[1], argv[2]
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(upstream_port, tls))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
