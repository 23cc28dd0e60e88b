"""A small fault-injecting HTTP proxy in front of moto.

moto never throttles and never fails; real IAM does both. Every AWS call the operator makes goes
through this proxy (AWS_ENDPOINT_URL points here), which
- counts calls by service and action ("iam:CreateAccessKey") and outcome, and the highest number
  of calls seen in any one-second window (for benchmarks);
- injects, where a test asks for it, Throttling errors, 5xx before forwarding, 5xx *after*
  forwarding (the call took effect, the answer is lost) and latency.

Requests are forwarded byte for byte with their Host header, so SigV4 signatures still verify.
IAM answers are made like real IAM's in one respect: CreateDate is cut to whole seconds (moto gives
microseconds), so the operator's write-ahead recovery meets the clock skew it must handle.

Control API (JSON), on the same port:
  GET  /__proxy/stats            counters
  POST /__proxy/reset            zero the counters and clear every fault
  POST /__proxy/faults           {"throttle": 0.3, "error": 0.1, "error_after": 0.1,
                                  "latency_ms": 2000, "actions": ["iam:CreateAccessKey"],
                                  "seed": 1}  (rates are probabilities per call; "actions"
                                  limits them to those actions; omitted keys are 0/all)
  POST /__proxy/fail-next        {"action": "iam:CreateAccessKey", "fault": "error_after",
                                  "count": 1}  exact one-shot faults, used before the rates
"""

import argparse
import http.client
import json
import random
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

FAULTS = ("throttle", "error", "error_after")
WHOLE_SECONDS = re.compile(rb"(<CreateDate>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d+Z")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.counts = defaultdict(lambda: defaultdict(int))
        self.total = 0
        self.window = deque()  # timestamps of the last second's calls
        self.max_per_second = 0
        self.rates = {}
        self.latency_ms = 0
        self.actions = None
        self.rng = random.Random()
        self.one_shots = []  # [action, fault, remaining]

    def choose_fault(self, action):
        with self.lock:
            now = time.monotonic()
            self.total += 1
            self.window.append(now)
            while self.window and self.window[0] <= now - 1.0:
                self.window.popleft()
            self.max_per_second = max(self.max_per_second, len(self.window))
            for shot in self.one_shots:
                if shot[0] == action and shot[2] > 0:
                    shot[2] -= 1
                    return shot[1], 0
            if self.actions is not None and action not in self.actions:
                return None, 0
            for fault in FAULTS:
                rate = self.rates.get(fault, 0.0)
                if rate and self.rng.random() < rate:
                    return fault, self.latency_ms
            return None, self.latency_ms

    def record(self, action, outcome):
        with self.lock:
            self.counts[action][outcome] += 1

    def snapshot(self):
        with self.lock:
            return {
                "total": self.total,
                "max_per_second": self.max_per_second,
                "calls": {a: dict(o) for a, o in sorted(self.counts.items())},
            }


STATE = State()


def error_body(service, code, message):
    ns = "https://iam.amazonaws.com/doc/2010-05-08/" if service == "iam" else "https://sts.amazonaws.com/doc/2011-06-15/"
    return (
        '<ErrorResponse xmlns="%s"><Error><Type>%s</Type><Code>%s</Code><Message>%s</Message></Error>'
        "<RequestId>%s</RequestId></ErrorResponse>"
        % (ns, "Sender" if code == "Throttling" else "Receiver", code, message, uuid.uuid4())
    ).encode()


def classify(headers, body, path):
    """Return (service, "service:Action") of a query- or JSON-protocol request."""
    service = "unknown"
    auth = headers.get("Authorization", "")
    if "Credential=" in auth:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
        if len(scope) >= 4:
            service = scope[3]
    params = parse_qs(body.decode("utf-8", "replace")) if body else {}
    if "?" in path:
        params.update(parse_qs(path.split("?", 1)[1]))
    action = params.get("Action", [None])[0]
    if action is None:
        # JSON-protocol services (SQS) name the operation in a header instead.
        target = headers.get("X-Amz-Target", "")
        action = target.rsplit(".", 1)[-1] if target else "unknown"
    return service, "%s:%s" % (service, action)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None

    def log_message(self, fmt, *args):  # the request line only; never bodies (they hold secrets)
        pass

    def reply(self, status, body, content_type="text/xml"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def control(self, body):
        if self.path == "/__proxy/stats" and self.command == "GET":
            return self.reply(200, json.dumps(STATE.snapshot()).encode(), "application/json")
        if self.path == "/__proxy/reset" and self.command == "POST":
            with STATE.lock:
                STATE.reset()
            return self.reply(200, b"{}", "application/json")
        try:
            req = json.loads(body or b"{}")
        except ValueError as e:
            return self.reply(400, json.dumps({"error": str(e)}).encode(), "application/json")
        if self.path == "/__proxy/faults" and self.command == "POST":
            with STATE.lock:
                STATE.rates = {f: float(req.get(f, 0.0)) for f in FAULTS}
                STATE.latency_ms = int(req.get("latency_ms", 0))
                STATE.actions = set(req["actions"]) if req.get("actions") else None
                if "seed" in req:
                    STATE.rng.seed(req["seed"])
            return self.reply(200, b"{}", "application/json")
        if self.path == "/__proxy/fail-next" and self.command == "POST":
            if req.get("fault") not in FAULTS or not req.get("action"):
                return self.reply(400, b'{"error": "need action and fault (throttle|error|error_after)"}', "application/json")
            with STATE.lock:
                STATE.one_shots.append([req["action"], req["fault"], int(req.get("count", 1))])
            return self.reply(200, b"{}", "application/json")
        return self.reply(404, b'{"error": "unknown control path"}', "application/json")

    def handle_any(self):
        body = self.read_body()
        if self.path.startswith("/__proxy/"):
            return self.control(body)
        service, action = classify(self.headers, body, self.path)
        fault, latency_ms = STATE.choose_fault(action)
        if latency_ms:
            time.sleep(latency_ms / 1000.0)
        if fault == "throttle":
            STATE.record(action, "throttled")
            return self.reply(400, error_body(service, "Throttling", "Rate exceeded"))
        if fault == "error":
            STATE.record(action, "error")
            return self.reply(500, error_body(service, "ServiceFailure", "injected failure before forwarding"))
        try:
            conn = http.client.HTTPConnection(*self.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
        except OSError as e:
            STATE.record(action, "upstream_error")
            return self.reply(502, error_body(service, "ServiceUnavailable", "upstream: %s" % type(e).__name__))
        if fault == "error_after":
            STATE.record(action, "error_after")
            return self.reply(500, error_body(service, "ServiceFailure", "injected failure after forwarding"))
        if service == "iam":
            data = WHOLE_SECONDS.sub(rb"\1Z", data)
        STATE.record(action, "ok" if resp.status < 400 else "status_%d" % resp.status)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--upstream", required=True, help="host:port of moto")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    uhost, uport = args.upstream.rsplit(":", 1)
    Handler.upstream = (uhost, int(uport))
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    print("faultproxy listening on %s, upstream %s" % (args.listen, args.upstream), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
