"""Job webhooks: the URL is checked when the job is submitted, and the outcome POSTed with retries.

A URL is refused unless its scheme is http(s) and every address its host resolves to is public: loopback,
link-local, private, multicast and reserved ranges are never contacted, unless the host is listed in
``WEBHOOK_ALLOW_HOSTS`` (for a receiver on the same network, deliberately). The address is checked again at
delivery, so a DNS answer that changes in between gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.support.errors import InvalidInput

logger = logging.getLogger(__name__)


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    allow_hosts: str = Field("", alias="WEBHOOK_ALLOW_HOSTS", description="comma-separated hosts exempt from checks")
    attempts: int = Field(4, ge=1, le=10, alias="WEBHOOK_ATTEMPTS")
    backoff_s: float = Field(1.0, gt=0, alias="WEBHOOK_BACKOFF_SECONDS")
    timeout_s: float = Field(10.0, gt=0, alias="WEBHOOK_TIMEOUT_SECONDS")

    def allowed(self) -> set[str]:
        return {h.strip().lower() for h in self.allow_hosts.split(",") if h.strip()}


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified)


def check_url(url: str, settings: WebhookSettings, field: str = "webhookUrl") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook URL must be http(s)://host/...", field=field)
    host = parts.hostname.lower()
    if host in settings.allowed():
        return url
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidInput(f"webhook host {host!r} does not resolve", field=field) from e
    addresses = {str(info[4][0]) for info in infos}
    if not addresses or not all(_public(a) for a in addresses):
        raise InvalidInput(f"webhook host {host!r} is not a public address", field=field)
    return url


async def deliver(url: str, payload: dict, settings: WebhookSettings) -> bool:
    """POST the payload; retry on errors and 5xx with exponential backoff. True once delivered."""
    for attempt in range(settings.attempts):
        try:
            await asyncio.to_thread(check_url, url, settings)
            async with httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False) as client:
                response = await client.post(url, json=payload)
            if response.status_code < 500:
                return response.status_code < 400
            logger.warning("webhook %s answered %d (attempt %d)", url, response.status_code, attempt + 1)
        except (httpx.HTTPError, InvalidInput) as e:
            logger.warning("webhook %s failed: %s (attempt %d)", url, e, attempt + 1)
        await asyncio.sleep(settings.backoff_s * 2**attempt)
    return False
