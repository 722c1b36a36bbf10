"""Serve any reward over HTTP, so a reward with heavy or clashing dependencies runs in its own process.

Start one with `python -m reward_models.server REWARD` (or `RewardServer(reward)` in-process) and
score through it with `reward_models.client.RemoteReward(url, token_file=...)`.

Wire format, protocol v1 (no pickle anywhere; the server only parses JSON and raw numbers)::

    POST /v1/score
    Authorization: Bearer <token>
    Content-Type: application/x-genft-reward
    Content-Length: <n>                     (required; chunked bodies are refused)

    body = <u32 little-endian L> <L bytes UTF-8 JSON header> <pixel bytes>
    header = {"v": 1, "shape": [B, 3, H, W], "dtype": "float32" | "uint8", "prompts": [B strings]}
    pixels = B*3*H*W values, C order, little-endian: float32 in [0,1] (lossless), or uint8 0..255
             (read as value/255; a quarter of the bytes, rounding like an 8-bit image)

    200 -> {"reward": name, "scores": [B numbers]}   float32 scores written as JSON numbers: exact,
                                                      since float32 -> float64 -> repr round-trips
    4xx/5xx -> {"error": "<short message>"}          never a stack trace

    GET /health -> {"ok": true, "reward": name}      no token needed; reveals nothing else

Security: binds 127.0.0.1 unless `allow_remote=True` (CLI `--allow-remote`) and an explicit token are
given; every score request needs the bearer token (compared with `hmac.compare_digest`, else 401).
Before reading a body the server checks auth, Content-Length (411 missing, 413 over
`max_request_bytes`), Content-Type (415) and how many requests are in flight (503); it then reads
only the JSON header and checks version, fields, batch (413 over `max_batch`), image side (413 over
`max_image_size`) and that the pixel byte count matches the shape (400) before reading the pixels.
NaN/inf pixels -> 400. Scoring longer than `timeout_s` -> 504; a reward that raises -> 500 with its
message. The token travels in clear over plain HTTP: for remote use put TLS (a proxy) or an SSH
tunnel in front.
"""
from __future__ import annotations

import argparse
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ._base import RewardModel
from ._registry import load
from .client import CONTENT_TYPE, HEADER_PREFIX, HEALTH_PATH, SCORE_PATH, WIRE_DTYPES, WIRE_VERSION

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1 << 20
MIN_TOKEN_CHARS = 16
_HEADER_KEYS = {"v", "shape", "dtype", "prompts"}
_LINGER_S = 1.0
_LINGER_BYTES = 8 << 20

RewardSpec = Union[str, RewardModel, Callable[..., RewardModel]]


class RequestError(Exception):
    """A request the server refuses: carries the HTTP status and a short message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server: bytes, images, pixels, seconds, concurrency."""

    max_request_bytes: int = 256 << 20
    max_batch: int = 64
    max_image_size: int = 1024
    timeout_s: float = 60.0
    io_timeout_s: float = 30.0
    max_concurrent: int = 4

    def __post_init__(self) -> None:
        for field in ("max_request_bytes", "max_batch", "max_image_size", "max_concurrent"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        for field in ("timeout_s", "io_timeout_s"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{field} must be a positive number of seconds, got {value!r}")


# ---------------------------------------------------------------- parsing (pure functions)

def parse_header(raw: bytes, limits: Limits) -> Tuple[Tuple[int, int, int, int], str, List[str]]:
    """Validate the JSON request header; return (shape, wire dtype, prompts) or raise RequestError."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(400, "request header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise RequestError(400, "request header must be a JSON object")
    if set(header) != _HEADER_KEYS:
        raise RequestError(400, f"request header must have exactly the keys {sorted(_HEADER_KEYS)}, "
                                f"got {sorted(map(str, header))[:8]}")
    if header["v"] != WIRE_VERSION or isinstance(header["v"], bool):
        raise RequestError(400, f"unsupported protocol version {header['v']!r}; this server speaks v{WIRE_VERSION}")
    shape = _parse_shape(header["shape"], limits)
    if header["dtype"] not in WIRE_DTYPES:
        raise RequestError(400, f"dtype must be one of {sorted(WIRE_DTYPES)}, got {str(header['dtype'])[:32]!r}")
    return shape, header["dtype"], _parse_prompts(header["prompts"], shape[0])


def _parse_shape(shape: Any, limits: Limits) -> Tuple[int, int, int, int]:
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise RequestError(400, "shape must be a list of 4 ints [B, 3, H, W]")
    b, c, h, w = shape
    if c != 3 or min(b, h, w) < 1:
        raise RequestError(400, f"shape must be [B, 3, H, W] with B, H, W >= 1, got {shape}")
    if b > limits.max_batch:
        raise RequestError(413, f"batch of {b} images exceeds the server's max_batch={limits.max_batch}")
    if max(h, w) > limits.max_image_size:
        raise RequestError(413, f"images of {h}x{w} exceed the server's max_image_size={limits.max_image_size} pixels per side")
    return b, c, h, w


def _parse_prompts(prompts: Any, batch: int) -> List[str]:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "prompts must be a list of strings")
    if len(prompts) != batch:
        raise RequestError(400, f"got {batch} images but {len(prompts)} prompts; send one prompt per image")
    return prompts


def pixel_bytes(shape: Tuple[int, ...], dtype: str) -> int:
    """Bytes the pixels of `shape` take on the wire in `dtype`."""
    return math.prod(shape) * WIRE_DTYPES[dtype].itemsize


def decode_images(buf: Union[bytes, bytearray, memoryview], shape: Tuple[int, ...], dtype: str) -> torch.Tensor:
    """Pixels from the wire as float32 [B,3,H,W] (uint8 divided by 255); NaN/inf -> RequestError 400."""
    if len(buf) != pixel_bytes(shape, dtype):
        raise RequestError(400, f"pixel data has {len(buf)} bytes but shape {list(shape)} {dtype} needs "
                                f"{pixel_bytes(shape, dtype)}")
    arr = np.frombuffer(buf, dtype=WIRE_DTYPES[dtype]).reshape(shape)
    if dtype == "uint8":
        return torch.from_numpy(arr.astype(np.float32)) / 255.0
    images = torch.from_numpy(arr.astype(np.float32, copy=False))  # the buffer is ours and writable
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()[:16]
        raise RequestError(400, f"images contain NaN or infinity (batch indices {bad})")
    return images


# ---------------------------------------------------------------- scoring with a deadline

class _Scorer:
    """Runs the reward one batch at a time in a daemon thread, so a request can stop waiting after timeout_s."""

    def __init__(self, reward: RewardModel):
        self.reward = reward
        self.lock = threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: List[str], timeout_s: float,
                 on_done: Callable[[], None]) -> List[float]:
        """Scores, or RequestError 504/500; `on_done` runs when the work ends, even after a timeout."""
        box: Dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                with self.lock, torch.no_grad():
                    box["scores"] = self.reward(images, prompts).detach().float().cpu().tolist()
            except Exception as e:  # reported to the client as a message, logged here with traceback
                log.error("reward %r failed", self.reward.name, exc_info=True)
                box["error"] = e
            finally:
                on_done()
                done.set()

        threading.Thread(target=work, name="reward-score", daemon=True).start()
        if not done.wait(timeout_s):
            raise RequestError(504, f"scoring did not finish within the server's timeout_s={timeout_s:g} "
                                    "(reward too slow for this batch, or busy with an earlier request)")
        if "error" in box:
            e = box["error"]
            raise RequestError(500, f"reward {self.reward.name!r} failed: {type(e).__name__}: {str(e)[:300]}")
        return box["scores"]


# ---------------------------------------------------------------- HTTP

class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection: GET /health and POST /v1/score, answers always JSON, never a traceback."""

    protocol_version = "HTTP/1.1"
    server_version = "genft-reward"
    disable_nagle_algorithm = True
    server: "_HTTPServer"

    def setup(self) -> None:
        self.timeout = self.server.app.limits.io_timeout_s
        self._body_left = 0
        super().setup()
        self.server.app.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
            if self._body_left > 0:
                _linger(self.connection, self._body_left)
        finally:
            self.server.app.track(self.connection, False)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Stdlib-detected protocol errors (bad request line, huge headers, unknown method) as JSON."""
        self._send_json(code, {"error": message or self.responses.get(code, ("error",))[0]}, close=True)

    def do_GET(self) -> None:
        self._body_left = self._declared_length()  # a GET body is never read: close after answering
        close = self._body_left > 0
        if self.path == HEALTH_PATH:
            self._send_json(200, {"ok": True, "reward": self.server.app.reward_name}, close=close)
        else:
            self._send_json(404, {"error": f"no such path; use GET {HEALTH_PATH} or POST {SCORE_PATH}"}, close=close)

    def do_POST(self) -> None:
        self._body_left = self._declared_length()
        try:
            if self.path != SCORE_PATH:
                raise RequestError(404, f"no such path; POST {SCORE_PATH}")
            payload = self.server.app.score(self)
        except RequestError as e:
            unframed = "Content-Length" not in self.headers  # where this request ends is unknown: close
            self._send_json(e.status, {"error": e.message}, close=self._body_left > 0 or unframed,
                            extra={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
            return
        except Exception:
            log.exception("unexpected error while serving a score request")
            self._send_json(500, {"error": "internal server error (see the server log)"}, close=True)
            return
        self._send_json(200, payload)

    def handle_expect_100(self) -> bool:
        """Answer 'Expect: 100-continue' with the auth/size verdict before the client sends the body."""
        if self.path == SCORE_PATH:
            try:
                self.server.app.check_auth(self.headers.get("Authorization"))
                self.server.app.check_length(self)
            except RequestError as e:
                self._body_left = self._declared_length()
                self._send_json(e.status, {"error": e.message}, close=True)
                return False
        return super().handle_expect_100()

    def _declared_length(self) -> int:
        try:
            return max(int(self.headers.get("Content-Length", "0")), 0)
        except ValueError:
            return 0

    def read_exact(self, n: int) -> bytearray:
        """Read exactly n body bytes (400 if the body ends early, 408 if the client stalls)."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        try:
            while got < n:
                k = self.rfile.readinto(view[got:])
                if not k:
                    raise RequestError(400, f"request body ended after {got} of {n} expected bytes")
                got += k
        except (TimeoutError, socket.timeout):
            raise RequestError(408, "request body not received in time") from None
        finally:
            self._body_left -= got
        return buf

    def _send_json(self, status: int, payload: Dict[str, Any], close: bool = False,
                   extra: Optional[Dict[str, str]] = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if close or self.server.app.closed:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def _linger(sock: socket.socket, unread: int) -> None:
    """After answering without reading the body: stop writing, discard what is in flight (bounded), so
    closing does not reset the connection before the client has read our error."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER_S
        left = min(unread, _LINGER_BYTES)
        while left > 0 and time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = sock.recv(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    app: "_App"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection died mid-request (client gone): log it, print no traceback to stderr."""
        log.debug("connection from %s failed", client_address, exc_info=True)


class _App:
    """The server's state: reward, token, limits; checks a score request step by step."""

    def __init__(self, reward: RewardModel, token: str, limits: Limits):
        self.reward_name = str(reward.name)
        self._token = token.encode("ascii")
        self.limits = limits
        self.scorer = _Scorer(reward)
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.closed = False
        self._conns: set = set()
        self._conns_lock = threading.Lock()

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._conns_lock:
            (self._conns.add if open_ else self._conns.discard)(conn)

    def drop_connections(self) -> None:
        """Shut down open (keep-alive) connections so nothing is served after close()."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check_auth(self, header: Optional[str]) -> None:
        scheme, _, given = (header or "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"), self._token)
        if not ok:
            raise RequestError(401, "missing or wrong token (send 'Authorization: Bearer <token>')")

    def check_length(self, handler: _Handler) -> int:
        if "Transfer-Encoding" in handler.headers:
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        if len(handler.headers.get_all("Content-Length", [])) > 1:
            raise RequestError(400, "more than one Content-Length header")
        raw = handler.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "Content-Length is required")
        if not raw.strip().isdigit():
            raise RequestError(400, "Content-Length must be a non-negative integer")
        length = int(raw)
        if length > self.limits.max_request_bytes:
            raise RequestError(413, f"request of {length} bytes exceeds the server's "
                                    f"max_request_bytes={self.limits.max_request_bytes}")
        if length < HEADER_PREFIX.size:
            raise RequestError(400, "request body is too short to hold a header")
        return length

    def score(self, handler: _Handler) -> Dict[str, Any]:
        """Check, read, decode and score one request; raise RequestError with the status otherwise."""
        self.check_auth(handler.headers.get("Authorization"))
        length = self.check_length(handler)
        if handler.headers.get_content_type() != CONTENT_TYPE:
            raise RequestError(415, f"Content-Type must be {CONTENT_TYPE}")
        if not self.slots.acquire(blocking=False):
            raise RequestError(503, f"server busy: {self.limits.max_concurrent} requests in flight; retry later")
        handed_off = False  # once scoring starts, its thread frees the slot (a timed-out batch still holds one)
        try:
            shape, dtype, prompts = self._read_header(handler, length)
            images = decode_images(handler.read_exact(pixel_bytes(shape, dtype)), shape, dtype)
            handed_off = True
            scores = self.scorer(images, prompts, self.limits.timeout_s, on_done=self.slots.release)
        finally:
            if not handed_off:
                self.slots.release()
        return {"reward": self.reward_name, "scores": scores}

    def _read_header(self, handler: _Handler, length: int) -> Tuple[Tuple[int, int, int, int], str, List[str]]:
        (size,) = HEADER_PREFIX.unpack(handler.read_exact(HEADER_PREFIX.size))
        if size > min(MAX_HEADER_BYTES, length - HEADER_PREFIX.size):
            raise RequestError(400, f"header length {size} is larger than the body or {MAX_HEADER_BYTES} bytes")
        shape, dtype, prompts = parse_header(bytes(handler.read_exact(size)), self.limits)
        pixels = length - HEADER_PREFIX.size - size
        if pixels != pixel_bytes(shape, dtype):
            raise RequestError(400, f"byte count mismatch: shape {list(shape)} {dtype} needs "
                                    f"{pixel_bytes(shape, dtype)} pixel bytes, the body carries {pixels}")
        return shape, dtype, prompts


# ---------------------------------------------------------------- public API

def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals; any other name counts as remote."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or not token.isascii() \
            or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"token must be a printable ASCII string of at least {MIN_TOKEN_CHARS} characters "
                         "without spaces; make one with secrets.token_urlsafe(32)")
    return token


class RewardServer:
    """A reward served over HTTP; binds at construction, `start()` serves in a thread, `with` closes.

    >>> with RewardServer("jpeg_compressibility") as srv:        # doctest: +SKIP
    ...     remote = RemoteReward(srv.url, token=srv.token)
    """

    def __init__(self, reward: RewardSpec, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None, *,
                 allow_remote: bool = False, max_request_bytes: int = Limits.max_request_bytes,
                 max_batch: int = Limits.max_batch, max_image_size: int = Limits.max_image_size,
                 timeout_s: float = Limits.timeout_s, io_timeout_s: float = Limits.io_timeout_s,
                 max_concurrent: int = Limits.max_concurrent, reward_kwargs: Optional[Dict[str, Any]] = None):
        if not is_loopback(host):
            if not allow_remote:
                raise ValueError(f"refusing to bind non-loopback host {host!r}: pass allow_remote=True "
                                 "(CLI --allow-remote) and a token to serve other machines")
            if token is None:
                raise ValueError(f"binding non-loopback host {host!r} needs an explicit token "
                                 "(CLI --token-file); make one with secrets.token_urlsafe(32)")
        limits = Limits(max_request_bytes, max_batch, max_image_size, float(timeout_s), float(io_timeout_s),
                        max_concurrent)
        self.reward = load(reward, **(reward_kwargs or {}))
        self.token = _check_token(token) if token is not None else secrets.token_urlsafe(32)
        self.limits = limits
        self._app = _App(self.reward, self.token, limits)
        self._httpd = _bind(host, port)
        self._httpd.app = self._app
        self._thread: Optional[threading.Thread] = None
        self.host, self.port = host, self._httpd.server_address[1]

    def __repr__(self) -> str:
        return f"RewardServer(reward={self._app.reward_name!r}, url={self.url!r})"

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8765 (pass it to RemoteReward)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "RewardServer":
        """Serve in a daemon thread and return self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="reward-server", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until close() (or Ctrl-C)."""
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop accepting, drop open connections, release the port. Safe to call twice."""
        if self._app.closed:
            return
        self._app.closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        self._app.drop_connections()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _bind(host: str, port: int) -> _HTTPServer:
    cls = _HTTPServer
    if ":" in host:
        cls = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
    return cls((host, port), _Handler)


def serve(reward: RewardSpec, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None, *,
          max_request_bytes: int = Limits.max_request_bytes, max_batch: int = Limits.max_batch,
          timeout_s: float = Limits.timeout_s, ready: Optional[Callable[[RewardServer], None]] = None,
          **options: Any) -> None:
    """Serve `reward` (anything `reward_models.load` accepts) in this thread until interrupted.

    `ready(server)` is called once the port is bound (to print `server.url`); other keyword options
    are RewardServer's (allow_remote, max_image_size, io_timeout_s, max_concurrent, reward_kwargs).
    """
    server = RewardServer(reward, host, port, token, max_request_bytes=max_request_bytes,
                          max_batch=max_batch, timeout_s=timeout_s, **options)
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


# ---------------------------------------------------------------- CLI

def _token_from_file(path: Path) -> str:
    """Read the token from `path`, or create it there (mode 0600) with a fresh secret."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            print(f"warning: token file {path} is readable by other users; chmod 600 it", file=sys.stderr)
        return _check_token(path.read_text().strip())
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _parser() -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m reward_models.server",
                                description="Serve a reward over HTTP (token-protected, loopback by default).")
    p.add_argument("reward", help="registered reward name or 'package.module:Class'")
    p.add_argument("--kwargs", default="{}", help="JSON object of constructor arguments for the reward")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port, printed)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="read the token from this file, or create it there (default: a new private temp file)")
    p.add_argument("--print-token", action="store_true", help="also print the token itself")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (needs --token-file)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most images per request")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / 2**20, help="largest request body, MiB")
    p.add_argument("--max-image-size", type=int, default=d.max_image_size, help="largest image side, pixels")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds a request may spend scoring")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent, help="requests in flight before 503")
    p.add_argument("--verbose", action="store_true", help="log every request (never the token)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """CLI: serve a reward, print its URL and where the token is; Ctrl-C stops."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--kwargs must be a JSON object")
        if args.allow_remote and args.token_file is None:
            raise ValueError("--allow-remote needs --token-file, so the token can be copied to the client machine")
        token_file = args.token_file or Path(tempfile.mkdtemp(prefix="genft-reward-")) / "token"
        token = _token_from_file(token_file)

        def ready(server: RewardServer) -> None:
            print(f"serving reward {server.reward.name!r} at {server.url}", flush=True)
            print(f"token file: {token_file}  (client: RemoteReward({server.url!r}, token_file={str(token_file)!r}))",
                  flush=True)
            if args.print_token:
                print(f"token: {server.token}", flush=True)

        serve(args.reward, args.host, args.port, token, max_request_bytes=int(args.max_request_mb * 2**20),
              max_batch=args.max_batch, timeout_s=args.timeout, ready=ready, allow_remote=args.allow_remote,
              max_image_size=args.max_image_size, max_concurrent=args.max_concurrent, reward_kwargs=kwargs)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
