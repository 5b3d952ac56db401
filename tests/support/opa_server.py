#!/usr/bin/env python3
"""OPA-compatible REST server for casf-verifier's integration tests.

Evaluation is done by the real OPA engine (Go, via the PyPI package
`opa-golib-python-bindings`, import name `opa_bindings`), so Rego semantics
match production OPA; only the HTTP layer lives here. It speaks the subset of
the OPA REST API the verifier uses, plus a fault-injection endpoint:

  POST /v1/data/<a>/<b>  {"input": ...}  -> 200 {"result": <data.a.b>}
                                           -> 200 {}  when data.a.b is undefined
                                           -> 400 {"code", "message"} bad body
                                           -> 500 {"code", "message"} eval error
  POST /v1/data/...?provenance=true       -> adds "provenance": {"version",
                                             "bundles": {"casf": {"revision"}}},
                                             the revision a digest of the files
  GET  /health                            -> 200 {}
  POST /__fault {"mode": "ok"|"status500"|"nonjson"|"slow", "delay_ms": N}
  GET  /__fault                           -> current fault state

Usage:
  opa_server.py --policies DIR [--addr 127.0.0.1:0] [--log-requests]

Once the policies are loaded and the socket is listening it prints exactly one
line, `LISTENING <port>`, to stdout; a harness reads it to learn the port.
SIGTERM / SIGINT shut it down cleanly (exit status 0).
"""

import argparse
import hashlib
import json
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

FAULT_MODES = ("ok", "status500", "nonjson", "slow")
MAX_BODY = 16 * 1024 * 1024  # refuse absurd bodies rather than buffer them


class Fault:
    """Fault-injection state shared by all request threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.mode = "ok"
        self.delay_ms = 0

    def set(self, mode, delay_ms):
        with self._lock:
            self.mode, self.delay_ms = mode, delay_ms

    def get(self):
        with self._lock:
            return self.mode, self.delay_ms


class BadRequest(Exception):
    """Client error; becomes a 400 with OPA's error shape."""


def load_engine(policy_dir):
    """Build an engine holding every *.rego under policy_dir (recursively,
    like `opa run DIR`). Any parse/compile error is fatal: a test run against
    a half-loaded policy set would fail in confusing ways."""
    root = Path(policy_dir)
    if not root.is_dir():
        sys.exit(f"opa_server: policies directory not found: {root}")
    engine = OpaEngine()
    files = sorted(root.rglob("*.rego"))
    # What a bundle's manifest would call its revision: here a digest of the
    # files served, so that a changed policy is a changed revision.
    digest = hashlib.sha256()
    for path in files:
        text = path.read_text("utf-8")
        digest.update(f"{path.relative_to(root)}\n{len(text)}\n{text}".encode())
        try:
            engine.add_policy(str(path.relative_to(root)), text)
        except OpaError as e:
            sys.exit(f"opa_server: failed to load {path}: {e}")
    if not files:
        print(f"opa_server: warning: no *.rego files in {root}", file=sys.stderr)
    return engine, digest.hexdigest()[:16]


def data_path(url_path):
    """'/v1/data/casf/allow' -> 'casf.allow'; '/v1/data' -> '' (root doc)."""
    rest = url_path[len("/v1/data"):].strip("/")
    return ".".join(seg for seg in rest.split("/") if seg)


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so clients (reqwest) can keep connections alive, as with OPA.
    protocol_version = "HTTP/1.1"
    server_version = "casf-test-opa/1"

    # -- plumbing -------------------------------------------------------

    def log_message(self, fmt, *args):
        if self.server.log_requests:
            super().log_message(fmt, *args)

    def _send(self, status, body, content_type="application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status, code, message):
        self._send(status, {"code": code, "message": message})

    def _read_body(self):
        """Raw request body; handles Content-Length and chunked encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # skip trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise BadRequest(f"request body too large ({length} bytes)")
        return self.rfile.read(length) if length else b""

    def _read_json(self):
        raw = self._read_body()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"body is not valid JSON: {e}") from None

    # -- routes ---------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {})
        elif path == "/__fault":
            mode, delay_ms = self.server.fault.get()
            self._send(200, {"mode": mode, "delay_ms": delay_ms})
        elif path == "/v1/data" or path.startswith("/v1/data/"):
            self._data(path, None)  # OPA allows GET without input
        else:
            self._error(404, "resource_not_found", f"no route for GET {path}")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_json()
        except (BadRequest, ValueError) as e:
            self.close_connection = True  # body may be half-read
            return self._error(400, "invalid_parameter", str(e))
        if path == "/__fault":
            self._set_fault(body)
        elif path == "/v1/data" or path.startswith("/v1/data/"):
            if body is not None and not isinstance(body, dict):
                return self._error(400, "invalid_parameter", "body must be a JSON object")
            self._data(path, (body or {}).get("input"))
        else:
            self._error(404, "resource_not_found", f"no route for POST {path}")

    def do_PUT(self):
        self._error(405, "method_not_allowed", "method not supported by test server")

    do_DELETE = do_PATCH = do_PUT

    def _set_fault(self, body):
        if not isinstance(body, dict) or body.get("mode") not in FAULT_MODES:
            return self._error(
                400, "invalid_parameter", f"body must be {{\"mode\": one of {FAULT_MODES}}}"
            )
        delay_ms = body.get("delay_ms", 0)
        if not isinstance(delay_ms, int) or isinstance(delay_ms, bool) or delay_ms < 0:
            return self._error(400, "invalid_parameter", "delay_ms must be a non-negative integer")
        self.server.fault.set(body["mode"], delay_ms)
        self._send(200, {"mode": body["mode"]})

    def _data(self, path, input_doc):
        mode, delay_ms = self.server.fault.get()
        if mode == "status500":
            return self._error(500, "internal_error", "fault injected: status500")
        if mode == "nonjson":
            # Declared as JSON on purpose: the client must notice by parsing.
            return self._send(200, b"not json")
        if mode == "slow":
            time.sleep(delay_ms / 1000)
        try:
            # The bindings treat input=None as "no input" (undefined), which
            # is also what OPA does for a body without an "input" key.
            result = self.server.engine.eval_document(data_path(path), input_doc)
        except OpaUndefinedError:
            return self._send(200, {})  # OPA: undefined -> no "result" key
        except OpaError as e:
            # prepare_error = query fails to compile (e.g. type error): OPA
            # answers 400; anything at evaluation time is a 500 in OPA.
            if e.code == "prepare_error":
                return self._error(400, "invalid_parameter", e.message)
            return self._error(500, "internal_error", f"{e.code}: {e.message}")
        answer = {"result": result}
        # OPA's `?provenance` (any value but "false"): the server's version
        # and each bundle's revision, in the same answer as the result.
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        if "provenance" in query and query["provenance"][-1] != "false":
            answer["provenance"] = {
                "version": "casf-test-server",
                "bundles": {"casf": {"revision": self.server.revision}},
            }
        self._send(200, answer)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # don't let a hung keep-alive connection block exit
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops SYNs when parallel tests open
    # connections at once; the 1s SYN retry then looks like an OPA timeout.
    request_queue_size = 128


def parse_addr(addr):
    """'HOST:PORT' or '[v6]:PORT' -> (host, port, address family)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        sys.exit(f"opa_server: --addr must be HOST:PORT, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1], int(port), socket.AF_INET6
    return host or "127.0.0.1", int(port), socket.AF_INET


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", required=True, help="directory of *.rego files")
    ap.add_argument("--addr", default="127.0.0.1:8181", help="HOST:PORT (port 0 = any free)")
    ap.add_argument("--log-requests", action="store_true", help="access log on stderr")
    ap.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS instead of HTTP")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ap.add_argument("--tls-client-ca", help="PEM CA file: require client certificates it signed")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        sys.exit("opa_server: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        sys.exit("opa_server: --tls-client-ca needs --tls-cert")

    engine, revision = load_engine(args.policies)
    host, port, family = parse_addr(args.addr)
    Server.address_family = family
    server = Server((host, port), Handler)
    server.engine, server.fault, server.log_requests = engine, Fault(), args.log_requests
    server.revision = revision
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            context.load_verify_locations(args.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        # The handshake runs on the request's thread, so a client that
        # rejects our certificate cannot stall the accept loop.
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )

    # shutdown() blocks until serve_forever() returns, so it must run on
    # another thread than the one serving (the main thread gets the signal).
    def stop(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    # The socket is already listening (bound in the constructor), so the port
    # is usable as soon as the harness reads this line.
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    main()
