#!/usr/bin/env python3
"""A demo clinic tool service for the quickstart: the upstream that Envoy
lets a call reach only after casf-verifier allowed it.

It answers every request with a small JSON echo of what arrived, including
the x-casf-* headers the verifier added, so a newcomer can see the decision
travel with the call. Python standard library only, so it runs from a
checkout (`python3 examples/demo_tools.py`) and in the compose stack's
python image alike. `GET /healthz` is its own health check.

Usage: demo_tools.py [--host 127.0.0.1] [--port 8080]  (port 0: any free port)
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DemoTools(BaseHTTPRequestHandler):
    server_version = "casf-demo-tools"

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/healthz":
            reply = {"status": "ok"}
        else:
            reply = {
                "tool_service": "demo",
                "method": self.command,
                "path": self.path,
                "body_bytes": len(body),
                "casf": {
                    name.lower(): value
                    for name, value in self.headers.items()
                    if name.lower().startswith("x-casf-")
                },
            }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, fmt, *args):  # one line per call, on stderr
        super().log_message(fmt, *args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), DemoTools)
    host, port = server.server_address[:2]
    print(f"demo tool service on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
