"""The reward server and RemoteReward: a real HTTP server on loopback (port 0) in a thread."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import reward_models
from reward_models import RewardModel
from reward_models.client import RemoteReward, RemoteRewardError, encode_request
from reward_models.server import CONTENT_TYPE, HEADER_PREFIX, SCORE_PATH, RewardServer

REPO = Path(__file__).resolve().parents[1]


class Weighted(RewardModel):
    """Uses every pixel and the prompt, so any change on the wire changes the score."""

    name = "weighted"

    def score(self, images, prompts):
        w = torch.linspace(-1.0, 1.0, images[0].numel()).reshape(images.shape[1:])
        return (images * w).flatten(1).sum(1) + torch.tensor([len(p) for p in prompts], dtype=torch.float32)


class Slow(RewardModel):
    name = "slow"

    def score(self, images, prompts):
        time.sleep(1.0)
        return torch.zeros(images.shape[0])


class Broken(RewardModel):
    name = "broken"

    def score(self, images, prompts):
        raise RuntimeError("secret internal detail")


@pytest.fixture
def server():
    with RewardServer(Weighted(), max_batch=4, max_image_size=64, max_request_bytes=100_000) as srv:
        yield srv


def batch(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), [f"prompt {i}" * (i + 1) for i in range(n)]


def post(url, body, headers):
    """A raw POST to the score endpoint: (status, parsed JSON body, raw text)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", SCORE_PATH, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode()
        return resp.status, json.loads(raw), raw
    finally:
        conn.close()


def auth(srv):
    return {"Authorization": f"Bearer {srv.token}", "Content-Type": CONTENT_TYPE}


def body_from(header: dict, pixels: bytes) -> bytes:
    head = json.dumps(header).encode()
    return HEADER_PREFIX.pack(len(head)) + head + pixels


def raw_exchange(url, head: str) -> str:
    """Send only request headers over a raw socket; return everything the server answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply.decode()


def assert_clean_400(status, payload, raw, match):
    assert status == 400, raw
    assert set(payload) == {"error"} and match in payload["error"], payload
    assert "Traceback" not in raw and 'File "' not in raw


# ------------------------------------------------------------------ exact scores


def test_jpeg_scores_through_the_server_equal_in_process_scores():
    local = reward_models.load("jpeg_compressibility")
    images, prompts = batch(4, 32)
    with RewardServer("jpeg_compressibility") as srv:
        remote = RemoteReward(srv.url, token=srv.token)
        assert torch.equal(remote(images, prompts), local(images, prompts))
        as_uint8 = RemoteReward(srv.url, token=srv.token, wire_dtype="uint8")
        assert torch.equal(as_uint8(images, prompts), local(images, prompts))  # JPEG quantises to 8 bit too


def test_custom_reward_round_trips_float32_losslessly(server):
    images, prompts = batch(3)
    images[0, 0, 0, 0] = 1e-40  # a float32 subnormal must survive the wire too
    remote = RemoteReward(server.url, token=server.token, batch_size=2)  # 2 requests, kept-alive connection
    out = remote(images, prompts)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.equal(out, Weighted()(images, prompts))
    assert torch.equal(remote(images, prompts), out)


def test_health_needs_no_token_and_reveals_only_the_name(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"ok": True, "reward": "weighted"}
    conn.close()


# ------------------------------------------------------------------ auth and limits


def test_missing_and_wrong_tokens_get_401(server):
    head, pixels = encode_request(*batch(1))
    body = head + bytes(pixels)
    status, payload, _ = post(server.url, body, {"Content-Type": CONTENT_TYPE})
    assert status == 401 and "token" in payload["error"]
    status, _, _ = post(server.url, body, {"Authorization": "Bearer " + "x" * 43, "Content-Type": CONTENT_TYPE})
    assert status == 401
    status, _, _ = post(server.url, body, {"Authorization": server.token, "Content-Type": CONTENT_TYPE})
    assert status == 401  # the scheme is required


def test_client_error_for_a_wrong_token_says_status_and_fix(server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("not-the-right-token-at-all\n")
    with pytest.raises(RemoteRewardError, match=rf"HTTP 401.*token in {token_file}.*token_file") as info:
        RemoteReward(server.url, token_file=token_file)(*batch(1))
    assert info.value.status == 401


def test_oversized_body_is_refused_from_content_length_without_reading_it(server):
    start = time.monotonic()
    reply = raw_exchange(server.url, f"POST {SCORE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                                     f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {10 << 30}\r\n\r\n")
    assert reply.startswith("HTTP/1.1 413") and "max_request_bytes" in reply  # no body was sent: never awaited
    assert time.monotonic() - start < 2


def test_expect_100_continue_gets_the_verdict_before_the_body(server):
    reply = raw_exchange(server.url, f"POST {SCORE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {'w' * 20}\r\n"
                                     f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    assert reply.startswith("HTTP/1.1 401") and "token" in reply


def test_missing_content_length_gets_411(server):
    reply = raw_exchange(server.url, f"POST {SCORE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n\r\n")
    assert reply.startswith("HTTP/1.1 411") and "Content-Length is required" in reply


def test_batch_and_image_size_limits_answer_413_with_a_fix(server):
    remote = RemoteReward(server.url, token=server.token)
    with pytest.raises(RemoteRewardError, match=r"HTTP 413: batch of 5 .*max_batch=4.*batch_size=N") as info:
        remote(*batch(5))
    assert info.value.status == 413
    with pytest.raises(RemoteRewardError, match=r"HTTP 413: images of 65x65 exceed.*max_image_size=64"):
        remote(*batch(1, size=65))
    assert torch.equal(RemoteReward(server.url, token=server.token, batch_size=4)(*batch(5)),
                       Weighted()(*batch(5)))  # chunking on the client fixes it


def test_request_bytes_limit_with_a_real_body(server):
    with pytest.raises(RemoteRewardError, match=r"HTTP 413.*max_request_bytes"):
        RemoteReward(server.url, token=server.token)(*batch(4, size=64))  # 4*3*64*64*4 B > 100 kB


# ------------------------------------------------------------------ malformed payloads


def test_malformed_payloads_get_400_without_a_traceback(server):
    px = bytes(4 * 3 * 2 * 2 * 4)
    good = {"v": 1, "shape": [1, 3, 2, 2], "dtype": "float32", "prompts": ["a"]}
    head = b"{not json"
    cases = [
        (HEADER_PREFIX.pack(len(head)) + head + px, "not valid UTF-8 JSON"),
        (body_from({**good, "extra": 1}, px), "exactly the keys"),
        (body_from({k: v for k, v in good.items() if k != "prompts"}, px), "exactly the keys"),
        (body_from({**good, "shape": [1, 4, 2, 2]}, px), "[B, 3, H, W]"),
        (body_from({**good, "shape": [1, 3, 2]}, px), "list of 4 ints"),
        (body_from({**good, "shape": [1, 3, 2, 2.0]}, px), "list of 4 ints"),
        (body_from({**good, "dtype": "float64"}, px), "dtype must be one of"),
        (body_from({**good, "prompts": [3]}, px), "list of strings"),
        (body_from({**good, "prompts": ["a", "b"]}, px), "one prompt per image"),
        (body_from({**good, "v": 2}, px), "protocol version"),
        (body_from(good, px[:-4]), "byte count mismatch"),
        (body_from(good, px + b"\0"), "byte count mismatch"),
        (HEADER_PREFIX.pack(10_000) + b"{}", "header length"),
        (b"\0", "too short"),
    ]
    for body, match in cases:
        assert_clean_400(*post(server.url, body, auth(server)), match)


def test_nan_and_inf_pixels_get_400(server):
    images, prompts = batch(2)
    images[1, 0, 3, 3] = float("nan")
    head, pixels = encode_request(images, prompts)
    assert_clean_400(*post(server.url, head + bytes(pixels), auth(server)), "NaN or infinity (batch indices [1])")
    images[1, 0, 3, 3] = float("inf")
    with pytest.raises(RemoteRewardError, match="HTTP 400: images contain NaN"):
        RemoteReward(server.url, token=server.token)(images, prompts)


def test_wrong_content_type_gets_415(server):
    head, pixels = encode_request(*batch(1))
    status, payload, _ = post(server.url, head + bytes(pixels), {**auth(server), "Content-Type": "application/json"})
    assert status == 415 and CONTENT_TYPE in payload["error"]


# ------------------------------------------------------------------ reward failures, binding, CLI


def test_slow_reward_times_out_with_504_and_a_clear_client_error():
    with RewardServer(Slow(), timeout_s=0.2) as srv:
        with pytest.raises(RemoteRewardError, match=r"HTTP 504: scoring did not finish within.*timeout_s=0.2.*--timeout"):
            RemoteReward(srv.url, token=srv.token, retries=0)(*batch(1))


def test_a_failing_reward_gives_500_with_its_message_but_no_traceback():
    with RewardServer(Broken()) as srv:
        head, pixels = encode_request(*batch(1))
        status, payload, raw = post(srv.url, head + bytes(pixels), auth(srv))
    assert status == 500 and "RuntimeError: secret internal detail" in payload["error"]
    assert "Traceback" not in raw and 'File "' not in raw


def test_non_loopback_bind_needs_allow_remote_and_a_token():
    with pytest.raises(ValueError, match="allow_remote=True"):
        RewardServer(Weighted(), host="0.0.0.0")
    with pytest.raises(ValueError, match="explicit token"):
        RewardServer(Weighted(), host="0.0.0.0", allow_remote=True)
    with pytest.raises(ValueError, match="at least 16 characters"):
        RewardServer(Weighted(), token="short")


def test_client_reports_an_unreachable_server_clearly():
    with RewardServer(Weighted()) as srv:
        url = srv.url
    with pytest.raises(ConnectionError, match=r"cannot reach the reward server at .*reward_models.server"):
        RemoteReward(url, token="t" * 32, retries=1)(*batch(1))


def test_cli_serves_prints_url_and_token_file_but_not_the_token(tmp_path):
    token_file = tmp_path / "tok"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "reward_models.server", "jpeg_compressibility", "--port", "0",
                             "--token-file", str(token_file), "--max-batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        url = first.split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:") and str(token_file) in second
        token = token_file.read_text().strip()
        assert token not in first + second and oct(token_file.stat().st_mode & 0o777) == "0o600"
        images, prompts = batch(3, 16)
        out = RemoteReward(url, token_file=token_file, batch_size=2)(images, prompts)
        assert torch.equal(out, reward_models.load("jpeg_compressibility")(images, prompts))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert token not in err
