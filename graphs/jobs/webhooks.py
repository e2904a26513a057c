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

from deployments.support.errors import InvalidInput
from deployments.support.settings import Settings

logger = logging.getLogger(__name__)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified)


def check_url(url: str, settings: Settings, field: str = "webhookUrl") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook URL must be http(s)://host/...", field=field)
    host = parts.hostname.lower()
    if host in settings.webhook_hosts():
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


async def deliver(url: str, payload: dict, settings: Settings) -> bool:
    """POST the payload; retry on errors and 5xx with exponential backoff. True once delivered."""
    for attempt in range(settings.webhook_attempts):
        try:
            await asyncio.to_thread(check_url, url, settings)
            async with httpx.AsyncClient(timeout=settings.webhook_timeout_seconds, follow_redirects=False) as client:
                response = await client.post(url, json=payload)
            if response.status_code < 500:
                return response.status_code < 400
            logger.warning("webhook %s answered %d (attempt %d)", url, response.status_code, attempt + 1)
        except (httpx.HTTPError, InvalidInput) as e:
            logger.warning("webhook %s failed: %s (attempt %d)", url, e, attempt + 1)
        await asyncio.sleep(settings.webhook_backoff_seconds * 2**attempt)
    return False
