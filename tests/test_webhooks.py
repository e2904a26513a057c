"""Webhook URL checks (no traffic to private ranges) and delivery with retries to a loopback receiver."""

from __future__ import annotations

import asyncio

import pytest

from deployments.support.errors import InvalidInput
from deployments.support.settings import Settings
from graphs.jobs.webhooks import check_url, deliver
from tests.helpers import Receiver


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/x", "http://10.0.0.1/x", "http://192.168.1.20/x",
    "http://172.16.0.5/x", "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://0.0.0.0/x",
    "ftp://93.184.216.34/x", "http:///nohost", "file:///etc/passwd",
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


def test_delivery_never_reaches_a_refused_host():
    receiver = Receiver()
    try:
        settings = Settings(WEBHOOK_BACKOFF_SECONDS=0.01, WEBHOOK_ATTEMPTS=2)  # loopback not allowed
        assert not asyncio.run(deliver(receiver.url, {"id": "x"}, settings))
        assert receiver.bodies == []
    finally:
        receiver.close()
