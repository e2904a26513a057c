"""Webhook URL checks (no traffic to private ranges, malformed URLs named) and delivery with retries to a loopback
receiver: pinned to the checked address, bounded in time, reading the status alone."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time

import pytest

from deployments.support.errors import InvalidInput
from deployments.support.settings import Settings
from graphs.jobs import webhooks
from graphs.jobs.webhooks import check_url, deliver
from tests.helpers import Receiver, tls_files


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/x", "http://10.0.0.1/x", "http://192.168.1.20/x",
    "http://172.16.0.5/x", "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://0.0.0.0/x",
    "ftp://93.184.216.34/x", "http:///nohost", "file:///etc/passwd",
    # malformed: urlsplit and .port raise ValueError
    "http://[::1", "http://example.com:99999/", "http://example.com:abc/",
    # not global, or standing in for an address that is not
    "http://100.100.100.200/latest/meta-data", "http://100.64.0.1/", "http://198.18.0.1/",
    "http://[2002:a9fe:a9fe::]/", "http://[2002:7f00:1::]/", "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
])
def test_private_and_malformed_urls_are_refused(url):
    with pytest.raises(InvalidInput) as e:
        check_url(url, Settings())
    assert e.value.field == "webhookUrl"


def test_public_address_and_allowlisted_host_pass():
    assert check_url("https://93.184.216.34/hook", Settings())
    assert check_url("http://127.0.0.1:9/hook", Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1"))


def test_delivery_retries_until_accepted():
    receiver = Receiver(failures=2)
    try:
        settings = Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1", WEBHOOK_BACKOFF_SECONDS=0.01)
        assert asyncio.run(deliver(receiver.url, {"id": "job_1", "status": "completed"}, settings))
        assert len(receiver.bodies) == 3 and receiver.bodies[-1] == {"id": "job_1", "status": "completed"}
    finally:
        receiver.close()


def test_the_log_never_shows_a_webhooks_secrets(caplog):
    """User, password, path and query are often the receiver's secret: a failed attempt logs scheme, host, port."""
    receiver = Receiver(failures=5)  # answers 500
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    settings = Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1", WEBHOOK_BACKOFF_SECONDS=0.01, WEBHOOK_ATTEMPTS=1)
    secret = "alice:S3cr3t@"
    try:
        with caplog.at_level("WARNING", logger="graphs.jobs.webhooks"):
            for url in (receiver.url.replace("http://", f"http://{secret}") + "/T0001/XSECRETX?token=tok_live_1",
                        f"http://{secret}127.0.0.1:{port}/T0001/XSECRETX?token=tok_live_1"):
                assert not asyncio.run(deliver(url, {"id": "job_1"}, settings))
    finally:
        receiver.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "answered 500" in lines[0] and "failed" in lines[1]
    assert lines[0].startswith("job job_1: webhook http://127.0.0.1:")  # which job's receiver, for the operator
    assert lines[1].startswith(f"job job_1: webhook http://127.0.0.1:{port}/... failed")
    assert not any(word in line for line in lines for word in ("alice", "S3cr3t", "XSECRETX", "tok_live"))


def test_delivery_never_reaches_a_refused_host():
    receiver = Receiver()
    try:
        settings = Settings(WEBHOOK_BACKOFF_SECONDS=0.01, WEBHOOK_ATTEMPTS=2)  # loopback not allowed
        assert not asyncio.run(deliver(receiver.url, {"id": "x"}, settings))
        assert receiver.bodies == []
    finally:
        receiver.close()


def test_an_attempt_connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding: the name is resolved once per attempt, by the check; the POST goes to that address."""
    receiver = Receiver()
    try:
        seen = []
        monkeypatch.setattr(webhooks, "_resolve", lambda host, port: seen.append(host) or ["127.0.0.1"])
        monkeypatch.setattr(webhooks, "_public", lambda address: True)  # as if 127.0.0.1 were the public answer
        url = f"http://rebind.invalid:{receiver.port}/hook"  # .invalid never resolves for real
        assert asyncio.run(deliver(url, {"id": "x"}, Settings(WEBHOOK_ATTEMPTS=1)))
        assert seen == ["rebind.invalid"] and receiver.hosts == [f"rebind.invalid:{receiver.port}"]
    finally:
        receiver.close()


def test_each_attempt_takes_the_next_checked_address(monkeypatch):
    receiver = Receiver()
    try:
        # the receiver listens on 127.0.0.1 alone: 127.0.0.2 refuses the connection
        monkeypatch.setattr(webhooks, "_resolve", lambda host, port: ["127.0.0.2", "127.0.0.1"])
        monkeypatch.setattr(webhooks, "_public", lambda address: True)
        settings = Settings(WEBHOOK_ATTEMPTS=2, WEBHOOK_BACKOFF_SECONDS=0.01)
        assert webhooks.vet("http://hook.example/x", settings).url == "http://127.0.0.2/x"
        assert webhooks.vet("http://hook.example/x", settings, attempt=1).url == "http://127.0.0.1/x"
        assert asyncio.run(deliver(f"http://hook.example:{receiver.port}/hook", {"id": "x"}, settings))
    finally:
        receiver.close()


def test_https_to_the_checked_address_verifies_the_host_name(monkeypatch, tmp_path):
    ca, cert, key = tls_files(tmp_path, "hook.test")
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    monkeypatch.setattr(webhooks, "_resolve", lambda host, port: ["127.0.0.1"])
    monkeypatch.setattr(webhooks, "_public", lambda address: True)
    receiver = Receiver(tls=(cert, key))
    try:
        settings = Settings(WEBHOOK_ATTEMPTS=1)
        assert asyncio.run(deliver(f"https://hook.test:{receiver.port}/hook", {"id": "x"}, settings))
        assert receiver.hosts == [f"hook.test:{receiver.port}"]
        # the certificate names hook.test, not other.test: verified against the name, not the address
        assert not asyncio.run(deliver(f"https://other.test:{receiver.port}/hook", {"id": "y"}, settings))
        assert len(receiver.bodies) == 1
    finally:
        receiver.close()


class _Slow(socketserver.BaseRequestHandler):
    """Answers 200 with its headers dripped a byte every 0.2 s for 4 s, then a 100 MB body."""

    def handle(self):
        self.request.recv(65536)
        try:
            self.request.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            for _ in range(20):
                self.request.sendall(b"x")
                time.sleep(0.2)
            self.request.sendall(b"\r\ncontent-length: 104857600\r\n\r\n")
            for _ in range(100):
                self.request.sendall(b"x" * (1 << 20))
        except OSError:
            pass  # the client hung up, as it should


def test_a_receiver_cannot_stretch_an_attempt_past_its_timeout():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1", WEBHOOK_TIMEOUT_SECONDS=0.5, WEBHOOK_ATTEMPTS=1)
        started = time.monotonic()
        assert not asyncio.run(deliver(f"http://127.0.0.1:{server.server_address[1]}/", {"id": "x"}, settings))
        assert time.monotonic() - started < 2.0
    finally:
        server.shutdown()
        server.server_close()


def test_only_the_status_of_an_answer_is_read():
    big = socket.create_server(("127.0.0.1", 0))

    def answer():
        connection, _ = big.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n" + b"x" * 65536)
            time.sleep(2)  # the rest of the gigabyte never comes: reading it would wait out the timeout

    threading.Thread(target=answer, daemon=True).start()
    try:
        settings = Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1", WEBHOOK_TIMEOUT_SECONDS=1.0, WEBHOOK_ATTEMPTS=1)
        started = time.monotonic()
        assert asyncio.run(deliver(f"http://127.0.0.1:{big.getsockname()[1]}/", {"id": "x"}, settings))
        assert time.monotonic() - started < 0.9
    finally:
        big.close()


@pytest.mark.parametrize(("retry_after", "expected"), [(None, 0.01), ("0", 0.01), ("0.03", 0.03), ("3600", 0.04),
                                                       ("Wed, 21 Oct 2015 07:28:00 GMT", 0.01), ("soon", 0.01)])
def test_429_is_retried_after_retry_after_within_the_backoff(monkeypatch, retry_after, expected):
    waits = []
    real_sleep = asyncio.sleep
    receiver = Receiver(failures=1, status=429, headers={"Retry-After": retry_after} if retry_after else None)

    async def delivered() -> bool:
        mine = asyncio.get_running_loop()

        async def sleep(seconds):  # asyncio's own: other event loops of this process (Serve's) sleep as ever
            if asyncio.get_running_loop() is not mine:
                return await real_sleep(seconds)
            waits.append(seconds)
            return await real_sleep(0)

        monkeypatch.setattr(webhooks.asyncio, "sleep", sleep)
        return await deliver(receiver.url, {"id": "x"}, settings)

    try:
        settings = Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1", WEBHOOK_BACKOFF_SECONDS=0.01, WEBHOOK_ATTEMPTS=4)
        assert asyncio.run(delivered())
        assert len(receiver.bodies) == 2
        assert waits == [pytest.approx(expected)]  # never below this attempt's backoff, nor past the longest
    finally:
        receiver.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_neither_followed_nor_counted_delivered(status):
    """An allowed receiver's answer could point the POST anywhere, past every check (here a loopback port that is
    not allowed): the attempt reads the 3xx and stops. The receiver did not take the payload, so it is not
    delivered either."""
    canary = socket.create_server(("127.0.0.1", 0))
    canary.setblocking(False)
    receiver = Receiver(failures=99, status=status,
                        headers={"Location": f"http://localhost:{canary.getsockname()[1]}/admin"})
    try:
        settings = Settings(WEBHOOK_ALLOW_HOSTS="127.0.0.1", WEBHOOK_TIMEOUT_SECONDS=1.0, WEBHOOK_ATTEMPTS=1)
        assert not asyncio.run(deliver(receiver.url, {"id": "x"}, settings))
        assert len(receiver.bodies) == 1
        with pytest.raises(BlockingIOError):  # nothing ever connected to it
            canary.accept()
    finally:
        receiver.close()
        canary.close()
