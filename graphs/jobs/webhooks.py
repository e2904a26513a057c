"""Job webhooks: the URL is checked when the job is submitted, and the outcome POSTed with retries.

A URL is refused (a 422 naming the field) unless it parses, its scheme is http(s) and every address its host
resolves to is global: not loopback, link-local, private, shared (100.64.0.0/10, where some clouds keep their
metadata service), multicast or reserved, nor an IPv6 address standing in for such an IPv4 one (IPv4-mapped, 6to4,
Teredo, NAT64). A host listed in ``WEBHOOK_ALLOW_HOSTS`` skips the address checks (for a receiver on the same
network, deliberately).

Each delivery attempt checks the URL again and connects to the very address it checked, never to a second DNS
answer, so a name that resolves elsewhere in between (DNS rebinding) gains nothing: the request goes to that
address with the host's name in ``Host`` and, for https, as the TLS server name the certificate is verified
against. An attempt lasts at most ``WEBHOOK_TIMEOUT_SECONDS`` in all, however slowly the receiver answers, and
reads the status alone. Failures to connect, 5xx and 429 are retried with exponential backoff; a 429's
``Retry-After`` is honoured within the backoff's bounds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx

from deployments.support.errors import InvalidInput
from deployments.support.settings import Settings
from graphs.jobs.store import Job

logger = logging.getLogger(__name__)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Target:
    """Where an attempt connects: the URL with the checked address in place of the host's name, and the name kept
    for the receiver (``Host``, the TLS server name). An allow-listed host is connected to by name."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


def _resolve(host: str, port: int) -> list[str]:
    """The host's addresses, in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _public(address: str) -> bool:
    """Global, and not an IPv6 address that embeds an IPv4 one that is not."""
    ip = ipaddress.ip_address(address)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        addresses += [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
        if ip in _NAT64:
            addresses.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return all(a.is_global and not a.is_multicast for a in addresses)


def vet(url: str, settings: Settings, field: str = "webhookUrl", attempt: int = 0) -> Target:
    """Check ``url`` as the module docstring says, and say where to connect for it: each attempt the next of the
    host's addresses, so that one unreachable address (IPv6 without a route) does not fail every attempt."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range or not a number
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        raise InvalidInput(f"webhook URL is malformed: {e}", field=field) from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook URL must be http(s)://host/...", field=field)
    host = parts.hostname.lower()
    if host in settings.webhook_hosts():
        return Target(url)
    try:
        addresses = _resolve(host, port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidInput(f"webhook host {host!r} does not resolve", field=field) from e
    if not addresses or not all(_public(a) for a in addresses):
        raise InvalidInput(f"webhook host {host!r} is not a public address", field=field)
    pinned = parsed.copy_with(host=addresses[attempt % len(addresses)].partition("%")[0])
    name = parsed.raw_host.decode("ascii")
    return Target(str(pinned), headers={"Host": parsed.netloc.decode("ascii")},
                  extensions={"sni_hostname": name} if parts.scheme == "https" else {})


def check_url(url: str, settings: Settings, field: str = "webhookUrl") -> str:
    """``url``, once it passes ``vet``."""
    vet(url, settings, field)
    return url


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


async def _post(target: Target, payload: dict, settings: Settings) -> tuple[int, float | None]:
    """One POST; its status and ``Retry-After``. The body of the answer is never read."""
    async with (httpx.AsyncClient(timeout=settings.webhook_timeout_seconds, follow_redirects=False) as client,
                client.stream("POST", target.url, json=payload, headers=target.headers,
                              extensions=target.extensions) as response):
        return response.status_code, _retry_after(response.headers.get("retry-after"))


def shown(url: str) -> str:
    """Where a webhook goes, as the log may say it: scheme, host and port. Its user, password, path and query are
    often the receiver's secret (Slack-style hook paths, ``?token=``), and logs travel further than job records."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return "<malformed URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/..."


def _why(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return type(error).__name__ if "://" in text else text  # a message that quotes a URL may quote its secret


async def attempt(url: str, payload: dict, settings: Settings, number: int) -> float | bool:
    """Attempt ``number`` (from 0) at POSTing the payload: True when it was delivered (a 2xx), False when it never
    will be (a 3xx, whose redirect is not followed, or a 4xx other than 429), else the seconds to wait before the
    next attempt (exponential backoff, a 429's ``Retry-After`` within its bounds). A failed attempt is logged with
    the job's id (``payload["id"]``), and of the URL only what ``shown`` keeps."""
    longest = settings.webhook_backoff_seconds * 2 ** max(0, settings.webhook_attempts - 2)
    wait = settings.webhook_backoff_seconds * 2**number
    async def post() -> tuple[int, float | None]:
        target = await asyncio.to_thread(vet, url, settings, "webhookUrl", number)
        return await _post(target, payload, settings)

    try:
        # The check's DNS lookup counts against the attempt's time too.
        status, retry_after = await asyncio.wait_for(post(), settings.webhook_timeout_seconds)
        if status < 500 and status != 429:
            return status < 300
        logger.warning("job %s: webhook %s answered %d (attempt %d)", payload.get("id"), shown(url), status,
                       number + 1)
        if retry_after is not None:
            wait = min(max(wait, retry_after), longest)
    except (httpx.HTTPError, InvalidInput, TimeoutError) as e:
        logger.warning("job %s: webhook %s failed: %s (attempt %d)", payload.get("id"), shown(url), _why(e),
                       number + 1)
    return wait


async def deliver(url: str, payload: dict, settings: Settings) -> bool:
    """POST the payload, up to ``WEBHOOK_ATTEMPTS`` times; True once delivered."""
    for number in range(settings.webhook_attempts):
        outcome = await attempt(url, payload, settings, number)
        if isinstance(outcome, bool):
            return outcome
        if number + 1 < settings.webhook_attempts:
            await asyncio.sleep(outcome)
    return False


def payload(job: Job) -> dict:
    """What a job's webhook says: its outcome, with ``seed`` where it has one."""
    return {"id": job.id, "jobId": job.id, "type": job.type, "status": job.status, "error": job.error,
            "seed": (job.result or {}).get("seed")}
