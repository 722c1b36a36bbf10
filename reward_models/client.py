"""RemoteReward: a reward scored by a `reward_models.server` in another process or machine.

It keeps the reward's dependencies out of the training environment: the trainer sees an ordinary
(non-differentiable) RewardModel whose `score` posts the batch to the server (wire format in
`reward_models/server.py`) and returns float32 [B]. Errors name the HTTP status, the server's
message and what to change.
"""
from __future__ import annotations

import http.client
import json
import select
import struct
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._base import RewardError, RewardModel

# The v1 wire format (described in reward_models/server.py); the server imports these from here, so
# importing the client never imports the server (keeps `python -m reward_models.server` warning-free).
WIRE_VERSION = 1
CONTENT_TYPE = "application/x-genft-reward"
SCORE_PATH = "/v1/score"
HEALTH_PATH = "/health"
HEADER_PREFIX = struct.Struct("<I")
WIRE_DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}

_CHUNK = 1 << 20
_RETRY_STATUSES = {502, 503}

_HINTS = {
    400: "the request was malformed; check the images are finite float [B,3,H,W] and that client and "
         "server run the same genft version",
    404: "check the URL: it should be the base URL the server printed (e.g. http://127.0.0.1:8765)",
    411: "send Content-Length (RemoteReward always does; is a proxy rewriting the request?)",
    413: "send smaller batches with RemoteReward(..., batch_size=N), or start the server with a larger "
         "--max-batch / --max-request-mb / --max-image-size",
    415: "client and server disagree on the protocol; use the same genft version on both sides",
    500: "the reward itself failed; the server's log has the traceback",
    503: "the server is busy; retry later, raise RemoteReward(retries=...) or the server's --max-concurrent",
    504: "raise the server's --timeout, or send smaller batches with RemoteReward(..., batch_size=N)",
}


class RemoteRewardError(RewardError):
    """The reward server answered with an error; `status` is the HTTP status, `server_message` its text."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


def encode_request(images: torch.Tensor, prompts: Sequence[str], wire_dtype: str = "float32") -> Tuple[bytes, memoryview]:
    """(length-prefixed JSON header, pixel bytes) for one batch, in the server's v1 wire format."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    x = images.detach().to("cpu", torch.float32)
    if wire_dtype == "uint8":
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = x.contiguous().numpy().astype(WIRE_DTYPES[wire_dtype], copy=False)
    header = json.dumps({"v": WIRE_VERSION, "shape": list(arr.shape), "dtype": wire_dtype,
                         "prompts": list(prompts)}).encode("utf-8")
    return HEADER_PREFIX.pack(len(header)) + header, memoryview(arr).cast("B")


def _read_token(token: Optional[str], token_file: Union[str, Path, None]) -> str:
    if (token is None) == (token_file is None):
        raise ValueError("pass exactly one of token= or token_file= (the server prints where its token file is)")
    if token is not None:
        return token
    path = Path(token_file)
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the reward server token from {path}: {e.strerror}") from None


class RemoteReward(RewardModel):
    """Score with a reward served by `python -m reward_models.server` (see that module for the protocol).

    - `url`: the base URL the server printed; `token` or `token_file`: its bearer token.
    - `timeout_s`: seconds to wait for connecting and for the answer (the server has its own --timeout).
    - `retries`: extra attempts after connection failures and 502/503 answers (with backoff).
    - `wire_dtype`: "float32" (lossless) or "uint8" (4x fewer bytes, 8-bit rounding).
    - `batch_size`: most images per request (keep it within the server's --max-batch).
    Not differentiable: gradients cannot cross the network.
    """

    name = "remote"

    def __init__(self, url: str, token: Optional[str] = None, *, token_file: Union[str, Path, None] = None,
                 name: Optional[str] = None, timeout_s: float = 60.0, retries: int = 2,
                 wire_dtype: str = "float32", batch_size: Optional[int] = None):
        super().__init__(batch_size=batch_size)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like http://127.0.0.1:8765, got {url!r}")
        if not timeout_s > 0 or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"need timeout_s > 0 and an int retries >= 0, got {timeout_s!r}, {retries!r}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.url = url.rstrip("/")
        self.name = name or f"remote({self.url})"
        self.token_file = None if token_file is None else str(token_file)
        self._token = _read_token(token, token_file)
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.wire_dtype = wire_dtype
        self._parts = parts
        self._conn: Optional[http.client.HTTPConnection] = None
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return f"url={self.url!r}, wire_dtype={self.wire_dtype!r}"

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_conn"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        head, pixels = encode_request(images, prompts, self.wire_dtype)
        with self._lock:
            status, body = self._post_with_retries(head, pixels)
        return self._parse_answer(status, body, images.shape[0])

    def close(self) -> None:
        """Close the kept-alive connection (a later call reconnects)."""
        with self._lock:
            self._drop()

    # -------------------------------------------------------------- transport

    def _post_with_retries(self, head: bytes, pixels: memoryview) -> Tuple[int, bytes]:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                status, body = self._post_once(head, pixels)
            except ConnectionError:
                if last:
                    raise
            else:
                if status not in _RETRY_STATUSES or last:
                    return status, body
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    def _post_once(self, head: bytes, pixels: memoryview) -> Tuple[int, bytes]:
        """One request; a stale kept-alive connection gets one silent reconnect."""
        reused = self._conn is not None
        try:
            return self._exchange(head, pixels)
        except (ConnectionError, http.client.HTTPException) as e:
            self._drop()
            if reused:
                try:
                    return self._exchange(head, pixels)
                except (ConnectionError, http.client.HTTPException) as e2:
                    self._drop()
                    raise self._unreachable(e2) from None
            raise self._unreachable(e) from None
        except TimeoutError:
            self._drop()
            raise TimeoutError(f"reward server at {self.url} did not answer within timeout_s={self.timeout_s:g}; "
                               "raise RemoteReward(timeout_s=...) or send smaller batches") from None
        except OSError as e:
            self._drop()
            raise self._unreachable(e) from None

    def _exchange(self, head: bytes, pixels: memoryview) -> Tuple[int, bytes]:
        conn = self._connection()
        conn.putrequest("POST", self._parts.path.rstrip("/") + SCORE_PATH, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {self._token}")
        conn.putheader("Content-Type", CONTENT_TYPE)
        conn.putheader("Content-Length", str(len(head) + len(pixels)))
        conn.endheaders(head)
        try:
            self._send_pixels(conn, pixels)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (e.g. 413) and closed; its answer may still be readable
        resp = conn.getresponse()
        body = resp.read()
        if resp.will_close:
            self._drop()
        return resp.status, body

    @staticmethod
    def _send_pixels(conn: http.client.HTTPConnection, pixels: memoryview) -> None:
        """Send in chunks, stopping as soon as the server has answered (it refused before reading)."""
        for start in range(0, len(pixels), _CHUNK):
            if select.select([conn.sock], [], [], 0)[0]:
                return
            conn.send(pixels[start:start + _CHUNK])

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout_s)
            self._conn.connect()
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _unreachable(self, e: BaseException) -> ConnectionError:
        return ConnectionError(f"cannot reach the reward server at {self.url} ({type(e).__name__}: {e}); "
                               "is `python -m reward_models.server` running there, and is the URL the one it printed?")

    # -------------------------------------------------------------- answers

    def _parse_answer(self, status: int, body: bytes, batch: int) -> torch.Tensor:
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            payload = None
        if status != 200:
            raise self._error(status, payload)
        scores = payload.get("scores") if isinstance(payload, dict) else None
        if (not isinstance(scores, list) or len(scores) != batch
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            raise RewardError(f"reward server at {self.url} sent an unexpected answer (expected {batch} scores); "
                              "is the URL a genft reward server of the same version?")
        return torch.tensor(scores, dtype=torch.float32)

    def _error(self, status: int, payload: Any) -> RemoteRewardError:
        message = payload.get("error") if isinstance(payload, dict) else None
        message = str(message) if message is not None else "(no JSON error message)"
        if status == 401:
            where = f"the token in {self.token_file} does not match" if self.token_file else "the token does not match"
            hint = (f"{where} the server's; pass the token from the file the server printed "
                    "(RemoteReward(url, token_file=...))")
        else:
            hint = _HINTS.get(status, "see the server's log")
        return RemoteRewardError(f"reward server at {self.url} answered HTTP {status}: {message}; {hint}",
                                 status, message)
