"""The service as the ``imagegen`` CLI sees it: JSON calls whose failures become one line and an exit status,
the server-sent event stream of a job (resumed after the last event id when a connection drops), and a progress
bar drawn from those events. Only ``httpx`` and the standard library: the CLI runs where torch does not.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

TERMINAL = ("completed", "failed", "cancelled")
RECONNECTS = 5  # empty streams or refused connections in a row before giving up
RECONNECT_PAUSE_S = 1.0  # doubled after each of them
HEALTHY_STREAM_S = 30.0  # a stream open this long was cut by a deadline, not refused
UNREACHABLE = 3  # the exit status when the service cannot be reached
BUSY = 5  # the exit status of a 429 or 503 answer
BUSY_POLL_S = 2.0  # how often a job is polled while the service has no event stream to spare
TIMEOUT_S = 600.0  # how long an answer may take (--timeout, IMAGEGEN_TIMEOUT)
# The service names request fields; a person typed flags.
FLAGS = {"width": "--width/--size", "height": "--height/--size", "steps": "--steps", "num_inference_steps": "--steps",
         "seed": "--seed", "sampler": "--sampler", "sampler_name": "--sampler", "model": "--checkpoint",
         "prompt": "PROMPT", "negativePrompt": "--negative", "negative_prompt": "--negative", "sizes": "--sizes",
         "upscaling_resize": "--scale", "upscaler_1": "--upscaler", "codeformer_weight": "--weight", "image": "IN",
         "preview_every": "--preview-every", "baseSizes": "--base-size", "Authorization": "--token",
         "guidanceScale": "--guidance", "guidance_scale": "--guidance"}


class CliError(Exception):
    """One line for the user and the exit status that goes with it."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status

    def about(self, job_id: str | None) -> CliError:
        """This error naming the job it happened to, so that ``imagegen jobs wait ID`` can pick the job up."""
        if job_id is None or job_id in str(self):
            return self
        return CliError(f"job {job_id}: {self}", self.status)


@dataclass
class Event:
    id: int
    name: str
    data: dict


def _service_body(response: httpx.Response) -> dict | None:
    """The service's error body ({"error", "code", "details"}), or None when another server answered."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("code"), str):
        return body
    return None


def _summary(response: httpx.Response) -> str:
    """A few words of an answer that is not the service's: an HTML page's title (else its text), whitespace
    collapsed; nothing when it only repeats the status."""
    text = response.text
    if "html" in response.headers.get("content-type", "") or re.match(r"\s*<(!doctype|html)", text, re.I):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        text = title[1] if title else re.sub(r"<(script|style|head)\b.*?</\1\s*>", " ", text, flags=re.I | re.S)
        text = html.unescape(re.sub(r"<[^>]*>", " ", text))
    text = " ".join(text.split())
    def bare(words: str) -> str:  # "504 Gateway Time-out" repeats "504 Gateway Timeout"
        return re.sub(r"[\W_]+", "", words).lower()

    if bare(text) in ("", bare(response.reason_phrase), bare(f"{response.status_code} {response.reason_phrase}")):
        return ""
    return text if len(text) <= 100 else text[:97] + "..."


def _explain(response: httpx.Response) -> CliError:
    """An error answer as one line and an exit status: the service's own error body, or a proxy's or another
    server's page (a gateway's 502 is not a failed job)."""
    body = _service_body(response)
    status = response.status_code
    if body is None:
        return _foreign(response)
    code, message = body["code"], body["error"]
    details: dict = body["details"] if isinstance(body.get("details"), dict) else {}
    if status == 401:
        return CliError(f"401 unauthorized: {message} (pass --token or set IMAGEGEN_TOKEN)", 4)
    if status in (429, 503):
        wait = response.headers.get("retry-after")
        if "retry" not in message.lower():  # "too many requests: retry in 1 s" says it already
            message = f"{message}; retry after {wait or 'a few'} s"
        return CliError(f"{status} {code}: {message}", BUSY)
    if status == 413 and isinstance(details.get("limit"), int):
        return CliError(f"413 {code}: the request is over the service's {details['limit'] / 2**20:.3g} MiB limit "
                        "(an image travels as base64, a third larger than its file)", 2)
    field = details.get("field")
    if field:
        flag = FLAGS.get(field)
        choices = details.get("choices")
        listed = f"; choices: {', '.join(map(str, choices))}" if isinstance(choices, list) and choices else ""
        message = f"{message} (field {field}{f', {flag}' if flag else ''}{listed})"
    return CliError(f"{status} {code}: {message}", 2 if status < 500 else 1)


def _foreign(response: httpx.Response) -> CliError:
    """An error page from a proxy, a gateway or a server that is not the service."""
    status, summary = response.status_code, _summary(response)
    head = f"{status} {response.reason_phrase}{f': {summary}' if summary else ''}"
    if status in (401, 403):
        return CliError(f"{head} (pass --token or set IMAGEGEN_TOKEN)", 4)
    if status == 413:
        return CliError(f"{head} (a proxy's body limit; an image travels as base64, a third larger than its file)", 2)
    if status in (429, 503):
        return CliError(f"{head}; retry after {response.headers.get('retry-after') or 'a few'} s", BUSY)
    if status in (502, 504):
        return CliError(f"{head} (a gateway got no answer from the service: is it running?)", UNREACHABLE)
    return CliError(f"{head} (not the service's answer: is --url or IMAGEGEN_URL the service?)", UNREACHABLE)


class Service:
    def __init__(self, url: str, token: str | None, timeout: float = TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Redirects are not followed: a POST would be resent as a GET, and the token to wherever it points.
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), transport=transport)

    def _unreachable(self, error: httpx.TransportError) -> CliError:
        if isinstance(error, httpx.ReadTimeout):
            return CliError(f"no answer from {self.url} within {self.timeout:g} s (--timeout or IMAGEGEN_TIMEOUT)",
                            UNREACHABLE)
        if isinstance(error, httpx.ConnectTimeout):
            reason = "connection timed out"
        else:
            reason = "connection refused" if "refused" in str(error).lower() else (str(error) or type(error).__name__)
        return CliError(f"cannot reach {self.url}: {reason} (is the service running? --url or IMAGEGEN_URL)",
                        UNREACHABLE)

    def _unexpected(self, response: httpx.Response) -> CliError:
        """A redirect, or a success that is not the service's JSON (or event stream): another server answered."""
        kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        moved = response.headers.get("location") if response.is_redirect else None
        return CliError(f"unexpected answer from {self.url} (HTTP {response.status_code}, {kind}"
                        f"{f', to {moved}' if moved else ''}): is --url the service?", UNREACHABLE)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        if response.status_code >= 400:
            raise _explain(response)
        try:
            if response.status_code < 300:
                return response.json()
        except ValueError:
            pass
        raise self._unexpected(response)

    def events(self, method: str, path: str, after: int = 0, **kwargs: Any) -> Iterator[Event]:
        """Server-sent events until the stream ends; a dropped connection simply ends it (the caller resumes). A
        stream that brings nothing within the timeout is an error (the service sends pings while a job waits)."""
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(after)} if after else {})}
        heard = False
        try:
            with self.http.stream(method, path, headers=headers, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _explain(response)
                if response.status_code >= 300 or "text/event-stream" not in response.headers.get("content-type", ""):
                    raise self._unexpected(response)
                for event in _parse(response.iter_lines()):
                    heard = True
                    yield event
        except httpx.ReadTimeout as e:
            if not heard:
                error = self._unreachable(e)
                if method == "POST":  # the submit may have queued the job all the same
                    error = CliError(f"{error}; a job may have been queued: imagegen jobs list", error.status)
                raise error from None
            return  # a stream that went quiet after it had spoken: resumed like a dropped one
        except (httpx.ReadError, httpx.RemoteProtocolError):
            return  # the connection dropped mid-stream: the caller resumes after the last event it saw
        except httpx.TransportError as e:
            raise self._unreachable(e) from None


def _parse(lines: Iterator[str]) -> Iterator[Event]:
    event_id, name = 0, "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield Event(event_id, name, json.loads("\n".join(data)))
            name, data = "message", []  # an id stays until the next one (as EventSource keeps it)
        elif not line.startswith(":"):  # ": ping" keeps the connection alive and says nothing
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "id" and value.isdigit():
                event_id = int(value)
            elif key == "event":
                name = value
            elif key == "data":
                data.append(value)


class ProgressBar:
    """One line redrawn in place on a terminal; elsewhere (logs, tests) one line per state and per tenth of each
    denoising pass, so that a long job, or the history of one replayed when it is attached to, stays short.
    Preview events (latent images) are not drawn."""

    WIDTH = 30

    def __init__(self, out: TextIO, quiet: bool = False) -> None:
        self.out, self.quiet, self.tty = out, quiet, out.isatty()
        self.passes, self.step, self.total, self.tenth = 1, 0, 0, -1

    def show(self, event: Event) -> None:
        if self.quiet or event.name == "preview":
            return
        if event.name == "progress" and not self._moved(event.data):
            return
        text, last = self.describe(event), event.name in TERMINAL
        if self.tty:
            self.out.write(f"\r\033[K{text}{chr(10) if last else ''}")
        else:
            self.out.write(f"{text}\n")
        self.out.flush()

    def _moved(self, d: dict) -> bool:
        """Counts the plan's denoising passes (a hires fix's second pass starts again at step 1, and the events do
        not name the stage); False for a step off a terminal that its pass's last line already covers."""
        step, total = d.get("step", 0), max(1, d.get("total", 1))
        if self.total and (step < self.step or total != self.total):
            self.passes, self.tenth = self.passes + 1, -1
        self.step, self.total = step, total
        tenth = 10 * step // total
        if not self.tty and tenth == self.tenth:
            return False
        self.tenth = tenth
        return True

    def describe(self, event: Event) -> str:
        d, job = event.data, event.data.get("job_id", "?")
        if event.name == "queued":
            return f"{job}: queued, position {d.get('position', '?')}"
        if event.name == "started":
            return f"{job}: started (attempt {d.get('attempt', 1)})"
        if event.name in ("progress", "preview"):
            step, total = d.get("step", 0), max(1, d.get("total", 1))
            done = round(self.WIDTH * step / total)
            eta = f" eta {d['eta_s']:.1f} s" if d.get("eta_s") is not None else ""
            stage = f"pass {self.passes}, " if self.passes > 1 else ""
            return f"{job}: [{'#' * done}{'.' * (self.WIDTH - done)}] {stage}step {step}/{total}{eta}"
        if event.name == "failed":
            return f"{job}: failed: {d.get('code', 'ERROR')}: {d.get('message', '')}"
        return f"{job}: {event.name}"


def follow(service: Service, bar: ProgressBar, job_id: str | None = None, submit: tuple[str, dict] | None = None
           ) -> Event:
    """Submit (streaming its events) or attach to a job, and follow it to its terminal event; a stream that ends
    early (a deadline, a proxy, a restarted replica) is resumed after the last event id seen. Once the service has
    answered about the job, a connection that cannot be made (a restart, a load balancer's failover) is one more
    try, the pauses between tries doubling. Ctrl-C cancels a job this call submitted, never one it only watches.
    Every error names the job once it is known."""
    after, failures, first, reached = 0, 0, True, False
    try:
        try:
            while True:
                if submit is not None and first:
                    source = service.events("POST", submit[0], json=submit[1])
                elif job_id is not None:
                    source = service.events("GET", f"/jobs/{job_id}/events", after=after)
                else:  # never submit twice: the first submit may have queued a job we did not hear of
                    raise CliError("the service closed the connection before naming the job; see imagegen jobs list")
                first, opened, heard, lost = False, time.monotonic(), False, None
                try:
                    for event in source:
                        job_id, after, heard = event.data.get("job_id", job_id), event.id, True
                        bar.show(event)
                        if event.name in TERMINAL:
                            return event
                except CliError as e:
                    # A first connection refused is the wrong URL, or no service to wait for.
                    retry = e.status == BUSY or (e.status == UNREACHABLE and (reached or heard))
                    if job_id is None or not retry:
                        raise
                    if e.status == BUSY:
                        reached = True
                        polled, lost = _poll_busy(service, job_id)
                        if polled is not None:
                            bar.show(polled)
                            return polled
                        if lost is None:
                            time.sleep(BUSY_POLL_S)
                            continue
                    else:
                        lost = e
                # The service ends every stream at its request deadline, however long the job: only connections
                # that brought nothing and closed at once, or could not be made, one after another, mean it cannot
                # be followed.
                reached = reached or lost is None
                healthy = heard or (lost is None and time.monotonic() - opened >= HEALTHY_STREAM_S)
                failures = 0 if healthy else failures + 1
                if failures > RECONNECTS:
                    if lost is not None:
                        raise CliError(f"{lost}; the job may still run: imagegen jobs wait {job_id}", UNREACHABLE)
                    raise CliError(f"the event stream of job {job_id} keeps closing", UNREACHABLE)
                time.sleep(RECONNECT_PAUSE_S * 2 ** max(0, failures - 1))
        except KeyboardInterrupt:
            if job_id is None:
                raise
            if submit is None:
                raise CliError(f"interrupted; {job_id} runs on: imagegen jobs wait {job_id}", 130) from None
            try:
                service.call("POST", f"/jobs/{job_id}/cancel")
            except CliError as e:
                raise CliError(f"interrupted; cancelling {job_id} failed: {e}", 130) from None
            raise CliError(f"interrupted: {job_id} cancelled", 130) from None
    except CliError as e:
        raise e.about(job_id) from None


def _poll_busy(service: Service, job_id: str) -> tuple[Event | None, CliError | None]:
    """No stream to spare (STREAMS_BUSY) or rate limited: the job itself can still be polled, and while that is
    refused too (the same rate limit), the client waits its turn. Returns the terminal event if the job has one,
    or the error of a service that could not be reached."""
    try:
        return _polled(service, job_id), None
    except CliError as e:
        if e.status == BUSY:
            return None, None
        if e.status == UNREACHABLE:
            return None, e
        raise


def _polled(service: Service, job_id: str) -> Event | None:
    """The job's terminal event as GET /jobs/{id} tells it; None while it is queued or running."""
    return terminal_event(service.call("GET", f"/jobs/{job_id}", params={"images": "false"}))


def terminal_event(job: dict) -> Event | None:
    """A job's view (GET /jobs/{id}) as the terminal event its stream ends with; None while it is queued or
    running."""
    if job["status"] not in TERMINAL:
        return None
    result = job.get("result") or {}
    data = {"job_id": job.get("id"), "status": job["status"], "warnings": result.get("warnings") or [],
            "nsfw": result.get("nsfw"), "seed": result.get("seed", job.get("seed"))}
    if job["status"] == "failed":
        error = job.get("error") or ""
        code, _, message = error.partition(": ")
        if not re.fullmatch(r"[A-Z_]+", code):  # the error is "CODE: message" when it has a code
            code, message = "ERROR", error
        data.update(code=code, message=message)
    return Event(0, job["status"], data)


def finish(event: Event) -> str:
    job = event.data.get("job_id", "?")
    if event.name == "failed":
        raise CliError(f"job {job} failed: {event.data.get('code', 'ERROR')}: {event.data.get('message', '')}")
    if event.name == "cancelled":
        raise CliError(f"job {job} was cancelled")
    return str(job)
