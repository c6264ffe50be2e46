"""Fetch a model named by URL into a partial file: resumable, retried, size- and hash-checked.

`download` appends to `part` and resumes from its length with an HTTP `Range` request; the
validator the server gave (a strong ETag, else Last-Modified) is kept beside it in
`part` + ".meta" and sent as `If-Range`, so a changed object is fetched again from byte 0.
Connection loss, timeouts and 5xx / 408 / 429 answers are retried with exponential backoff
and jitter until `DownloadSettings.timeout` has passed in all; any other 4xx is final. The
bytes are hashed as they arrive (after a resume, the prefix already on disk is hashed once).

Credentials never leave this module: every URL in a log line, an error or a progress report
goes through `redact_url` (no userinfo, no query string, no fragment).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, Final, NoReturn

import anyio
import httpx
import structlog

from agent.errors import (
    ChecksumMismatch,
    DownloadFailed,
    InvalidPayload,
    PayloadTooLarge,
    StateWriteFailed,
    clip,
)

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable

    from agent.config import DownloadSettings

__all__ = ["MAX_URL_CHARS", "check_url", "download", "redact_text", "redact_url"]

MAX_URL_CHARS: Final = 8192
"""Longest `model_url` accepted (presigned URLs run to about 2,000 characters)."""

_URL_PATH: Final = "$.model_url"
_SCHEMES: Final = ("http", "https")
_FLUSH_BYTES: Final = 1024 * 1024  # received bytes are written and hashed in a thread per MiB
_BACKOFF_MIN: Final = 0.25
_BACKOFF_MAX: Final = 15.0
_CONNECT_TIMEOUT: Final = 10.0
_READ_TIMEOUT_MAX: Final = 30.0
_MAX_REDIRECTS: Final = 5
_MAX_RESTARTS: Final = 4  # a server that keeps answering ranges inconsistently
_RETRY_STATUSES: Final = frozenset({408, 425, 429})
_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
# (signing time, lifetime in seconds): S3 SigV4 and GCS V4 presigned URLs
_PRESIGN_DATES: Final = (("x-amz-date", "x-amz-expires"), ("x-goog-date", "x-goog-expires"))
_PRESIGN_EXPIRED_HINT: Final = "an expired or wrongly signed presigned URL also answers so"

log = structlog.get_logger(__name__)


# --- URLs ------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """`url` without userinfo, query string or fragment: safe to log, whatever `url` is."""
    text = url.split("#", 1)[0].split("?", 1)[0]
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    authority, slash, path = rest.partition("/")
    # userinfo ends at the last `@` before the first slash (more than some parsers take)
    authority = authority.rsplit("@", 1)[-1]
    return f"{scheme}{sep}{authority}{slash}{path}"


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (for exception texts that may quote one)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def check_url(url: str, settings: DownloadSettings) -> None:
    """Refuse a `model_url` that is not an http(s) URL under an allowed prefix.

    Raises `InvalidPayload` at `$.model_url` with the reason; the URL is quoted redacted.
    """
    if len(url) > MAX_URL_CHARS:
        raise InvalidPayload(
            f"the URL is {len(url)} characters; at most {MAX_URL_CHARS}", path=_URL_PATH
        )
    shown = repr(clip(redact_url(url), 200))
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidPayload(
            f"{shown} holds a space or a control character; percent-encode it", path=_URL_PATH
        )
    try:
        parts = urllib.parse.urlsplit(url)
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise InvalidPayload(f"{shown} is not a valid URL", path=_URL_PATH) from None
    if parts.scheme.lower() not in _SCHEMES or parsed.scheme not in _SCHEMES:
        raise InvalidPayload(f"{shown} is not an http or https URL", path=_URL_PATH)
    if not parts.hostname or not parsed.host:
        raise InvalidPayload(f"{shown} names no host", path=_URL_PATH)
    prefixes = settings.allowed_url_prefixes
    if prefixes and not any(url.startswith(prefix) for prefix in prefixes):
        allowed = ", ".join(repr(p) for p in prefixes[:8])
        more = f" and {len(prefixes) - 8} more" if len(prefixes) > 8 else ""
        raise InvalidPayload(
            f"{shown} is not under download.allowed_url_prefixes ({allowed}{more})",
            path=_URL_PATH,
        )


def _presigned_expiry(url: str) -> float | None:
    """When a presigned URL (S3 v2/v4, GCS v4, Azure SAS) stops working; None if unknown."""
    try:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    except ValueError:
        return None
    values = {key.lower(): found[0] for key, found in query.items() if found}
    try:
        for date_key, expires_key in (
            ("x-amz-date", "x-amz-expires"),
            ("x-goog-date", "x-goog-expires"),
        ):
            if date_key in values and expires_key in values:
                start = datetime.strptime(values[date_key], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                return start.timestamp() + float(int(values[expires_key]))
        if "se" in values and "sig" in values:  # Azure shared access signature
            return datetime.fromisoformat(values["se"].replace("Z", "+00:00")).timestamp()
        if "expires" in values:
            return float(int(values["expires"]))
    except (ValueError, OverflowError):
        return None
    return None


def _status_reason(status: int, phrase: str, url: str) -> str:
    """Why a final HTTP status ended the download, for a person to act on."""
    what = f"HTTP {status}{f' {phrase}' if phrase else ''}"
    if status in (400, 401, 403):
        expiry = _presigned_expiry(url)
        if expiry is not None:
            at = datetime.fromtimestamp(expiry, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if expiry <= time.time():
                return f"{what}: the presigned URL expired at {at}; ask for a new one"
            return f"{what}: refused (the URL is presigned, valid until {at})"
        if status == 403:
            return f"{what}: not allowed ({_PRESIGN_EXPIRED_HINT})"
    if status == 404:
        return f"{what}: no such object at this URL"
    if status == 410:
        return f"{what}: the object was removed"
    return what


# --- the partial file ------------------------------------------------------------------------


@dataclass(slots=True)
class _Part:
    """The partial file, open for appending, with the hash of what it holds."""

    path: pathlib.Path
    meta: pathlib.Path
    sha256: str
    file: BinaryIO
    hasher: Any = field(default_factory=hashlib.sha256)
    length: int = 0
    validator: str | None = None  # sent as If-Range; None: the server gave none
    pieced: bool = False  # some bytes came by a resumed (ranged) request
    buffer: bytearray = field(default_factory=bytearray)

    def append(self, data: bytes | bytearray) -> None:
        """Write and hash `data` (in a worker thread: file I/O and hashing block)."""
        self.file.write(data)
        self.hasher.update(data)
        self.length += len(data)

    def truncate(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hasher = hashlib.sha256()
        self.length = 0
        self.validator = None
        self.pieced = False
        self.buffer.clear()

    def save_meta(self) -> None:
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        tmp.write_text(json.dumps({"sha256": self.sha256, "validator": self.validator}))
        tmp.replace(self.meta)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    async def flush(self) -> None:
        """Write the received bytes still in memory; never cut off half-way."""
        if not self.buffer:
            return
        data = bytes(self.buffer)
        self.buffer.clear()
        with anyio.CancelScope(shield=True):
            await _disk(self.append, data)

    @property
    def received(self) -> int:
        return self.length + len(self.buffer)


async def _disk(func: Callable[..., Any], *args: Any) -> Any:
    """Run blocking file work in a thread; an OSError becomes `StateWriteFailed`."""
    try:
        return await anyio.to_thread.run_sync(func, *args)
    except OSError as exc:
        raise StateWriteFailed(f"cannot write the partial download: {exc.strerror or exc}") from exc


def _open_part(path: pathlib.Path, sha256: str) -> _Part:
    """Open `path` to append; keep its bytes only if its sidecar says they are this model's."""
    meta = path.with_name(path.name + ".meta")
    validator: str | None = None
    keep = False
    try:
        saved = json.loads(meta.read_text())
        if isinstance(saved, dict) and saved.get("sha256") == sha256:
            keep = True
            found = saved.get("validator")
            validator = found if isinstance(found, str) else None
    except (OSError, ValueError):
        keep = False
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("r+b" if keep and path.exists() else "w+b")
    part = _Part(path=path, meta=meta, sha256=sha256, file=file, validator=validator)
    if not keep:
        return part
    try:
        while block := file.read(_FLUSH_BYTES):
            part.hasher.update(block)
            part.length += len(block)
    except OSError:
        file.close()
        raise
    return part


def _discard(part: _Part) -> None:
    part.file.close()
    for path in (part.path, part.meta):
        path.unlink(missing_ok=True)


# --- HTTP ------------------------------------------------------------------------------------


class _Retry(Exception):
    """This attempt failed in a way worth retrying."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _Restart(Exception):
    """Fetch again from byte 0 at once (the server ignored the range or the object changed)."""


def _validator(response: httpx.Response) -> str | None:
    """A validator usable in If-Range: a strong ETag, else Last-Modified."""
    etag: str | None = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = response.headers.get("last-modified")
    return modified


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of `Content-Range: bytes a-b/total`; None when malformed."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None
    total = None if match.group(2) == "*" else int(match.group(2))
    return int(match.group(1) or 0), total


@dataclass(slots=True)
class _Fetch:
    """One download: the URL, what is expected of it and the partial file it fills."""

    url: str
    shown: str  # the URL as logs and errors show it
    part: _Part
    size: int | None
    settings: DownloadSettings
    progress: Callable[[int, int | None], None]
    total: int | None = None
    restarts: int = 0
    wrong: bool = False  # the server sends something else than this model: discard it

    def _limit_total(self, total: int) -> None:
        """Refuse early a model the server says is too large or not `size` bytes."""
        limit = self.settings.max_model_bytes
        if total > limit:
            raise PayloadTooLarge(size=total, limit=limit)
        if self.size is not None and total != self.size:
            self.wrong = True
            raise DownloadFailed(
                reason=f"the server's copy is {total} bytes; model_size is {self.size}",
                url=self.shown,
            )
        self.total = total

    async def _restart(self, why: str) -> NoReturn:
        self.restarts += 1
        if self.restarts > _MAX_RESTARTS:
            raise DownloadFailed(reason=f"{why}, {_MAX_RESTARTS} times", url=self.shown)
        log.info("download restarts from byte 0", url=self.shown, reason=why)
        await _disk(self.part.truncate)
        raise _Restart

    async def attempt(self, client: httpx.AsyncClient) -> None:
        """One GET, appending to the partial file; returns when the model is complete."""
        part = self.part
        headers = {"Accept-Encoding": "identity"}
        offset = part.length
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if part.validator is not None:
                headers["If-Range"] = part.validator
        async with client.stream("GET", self.url, headers=headers) as response:
            status = response.status_code
            if status == 416 and offset:
                found = re.fullmatch(
                    r"\s*bytes\s+\*/(\d+)\s*", response.headers.get("content-range", "")
                )
                if found is not None and int(found.group(1)) == offset:
                    self._limit_total(offset)
                    return  # we already had every byte
                await self._restart("the server refused the range")
            if status >= 500 or status in _RETRY_STATUSES:
                raise _Retry(f"HTTP {status} {response.reason_phrase}".rstrip(), status)
            if status not in (200, 206):
                raise DownloadFailed(
                    reason=_status_reason(status, response.reason_phrase, self.url),
                    status=status,
                    url=self.shown,
                )
            validator = _validator(response)
            if status == 206:
                span = _content_range(response.headers.get("content-range"))
                if span is None or span[0] != offset:
                    await self._restart("the server answered another range than asked")
                if part.validator is not None and validator not in (None, part.validator):
                    await self._restart("the object changed on the server")
                if span[1] is not None:
                    self._limit_total(span[1])
                part.pieced = part.pieced or offset > 0
            else:
                if offset:
                    log.info(
                        "download restarts from byte 0",
                        url=self.shown,
                        reason="the server sent the whole object",
                    )
                    await _disk(part.truncate)
                length = response.headers.get("content-length")
                if length is not None and length.isdigit():
                    self._limit_total(int(length))
                part.validator = validator
                await _disk(part.save_meta)
            await self._receive(response)

    async def _receive(self, response: httpx.Response) -> None:
        part = self.part
        limit = self.size if self.size is not None else self.settings.max_model_bytes
        try:
            async for block in response.aiter_raw():
                part.buffer += block
                if part.received > limit:
                    if self.size is None:
                        raise PayloadTooLarge(size=part.received, limit=limit)
                    self.wrong = True
                    raise DownloadFailed(
                        reason=f"the server sent more than model_size ({self.size} bytes)",
                        url=self.shown,
                    )
                self.progress(part.received, self.total)
                if len(part.buffer) >= _FLUSH_BYTES:
                    await part.flush()
        finally:
            await part.flush()

    async def run(self) -> None:
        """Attempts with backoff until the model is complete, a final error, or the timeout."""
        settings = self.settings
        read_timeout = min(_READ_TIMEOUT_MAX, settings.timeout / 4)
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise DownloadFailed(
                    reason=f"cannot load download.ca_file {settings.ca_file}: {exc}",
                    url=self.shown,
                ) from None
        last: _Retry | None = None
        delay = _BACKOFF_MIN
        async with httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(read_timeout, connect=min(_CONNECT_TIMEOUT, read_timeout)),
            follow_redirects=True,
            max_redirects=_MAX_REDIRECTS,
            event_hooks={"request": [self._check_redirect]},
            trust_env=False,
        ) as client:
            with anyio.move_on_after(settings.timeout) as scope:
                while True:
                    before = self.part.received
                    try:
                        await self.attempt(client)
                    except _Restart:
                        continue
                    except _Retry as exc:
                        last = exc
                    except httpx.TransportError as exc:
                        self._final_if_untrusted(exc)
                        last = _Retry(self._network_reason(exc))
                    except httpx.TooManyRedirects:
                        raise DownloadFailed(
                            reason=f"more than {_MAX_REDIRECTS} redirects", url=self.shown
                        ) from None
                    else:
                        return
                    if self.part.received > before:
                        delay = _BACKOFF_MIN  # it moved on: the trouble may be over
                    pause = random.uniform(delay / 2, delay)  # noqa: S311  # jitter, not crypto
                    log.info(
                        "download retry",
                        url=self.shown,
                        reason=last.reason,
                        received=self.part.received,
                        delay=round(pause, 2),
                    )
                    await anyio.sleep(pause)
                    delay = min(delay * 2, _BACKOFF_MAX)
        if scope.cancelled_caught:
            why = f"; last: {last.reason}" if last is not None else ""
            raise DownloadFailed(
                reason=f"not complete within download.timeout ({settings.timeout:g} s){why}",
                status=None if last is None else last.status,
                url=self.shown,
            )

    async def _check_redirect(self, request: httpx.Request) -> None:
        """Every request, redirects included, must stay under the allowed prefixes."""
        if request.url == httpx.URL(self.url):
            return
        try:
            check_url(str(request.url), self.settings)
        except InvalidPayload as exc:
            raise DownloadFailed(
                reason=f"redirected to a refused URL: {exc.reason}", url=self.shown
            ) from None

    def _final_if_untrusted(self, exc: httpx.TransportError) -> None:
        """A certificate that does not verify will not verify on a retry either."""
        cause: BaseException | None = exc
        for _ in range(8):
            if cause is None:
                return
            if isinstance(cause, ssl.SSLCertVerificationError):
                trusted = self.settings.ca_file or "httpx's bundled CA set"
                raise DownloadFailed(
                    reason=f"TLS: the server's certificate is not trusted by {trusted} "
                    f"({cause.verify_message})",
                    url=self.shown,
                ) from None
            cause = cause.__cause__ or cause.__context__

    def _network_reason(self, exc: httpx.TransportError) -> str:
        kind = type(exc).__name__
        text = redact_text(str(exc))
        return f"{kind}: {clip(text, 200)}" if text else kind


# --- the entry point -------------------------------------------------------------------------


async def download(
    url: str,
    part: pathlib.Path,
    *,
    sha256: str,
    size: int | None,
    settings: DownloadSettings,
    progress: Callable[[int, int | None], None],
) -> None:
    """Fetch `url` into `part` (resuming what it holds) and check its size and sha256.

    On return `part` holds the whole model, flushed to disk. Raises `InvalidPayload`
    (`check_url`), `DownloadFailed` (the partial file is kept, to resume later),
    `PayloadTooLarge` or `ChecksumMismatch` (the partial file is removed), `StateWriteFailed`.
    `progress(received, total)` is called as bytes arrive; `total` is None until known.
    """
    check_url(url, settings)
    if size is not None and size > settings.max_model_bytes:
        raise PayloadTooLarge(size=size, limit=settings.max_model_bytes)
    expected = sha256.lower()
    opened: _Part = await _disk(_open_part, part, expected)
    fetch = _Fetch(
        url=url,
        shown=clip(redact_url(url), 200),
        part=opened,
        size=size,
        settings=settings,
        progress=progress,
        total=size,
    )
    if opened.length:
        log.info("download resumes", url=fetch.shown, offset=opened.length)
    try:
        await _complete(fetch, expected)
    except (ChecksumMismatch, PayloadTooLarge, DownloadFailed) as exc:
        if fetch.wrong or not isinstance(exc, DownloadFailed):
            # what was received is not this model: nothing to resume from
            with anyio.CancelScope(shield=True):
                await _disk(_discard, opened)
        raise
    finally:
        opened.file.close()


async def _complete(fetch: _Fetch, expected: str) -> None:
    """Fetch until the partial file holds the model; check its size and sha256."""
    part = fetch.part
    whole_again = False
    while True:
        await fetch.run()
        actual = part.hasher.hexdigest()
        if fetch.size is not None and part.length != fetch.size:
            fetch.wrong = True
            raise DownloadFailed(
                reason=f"received {part.length} bytes; model_size is {fetch.size}",
                url=fetch.shown,
            )
        if actual == expected:
            break
        if part.pieced and not whole_again:
            # the pieces may come from two versions of an object that has no validator
            log.info("download checksum mismatch; fetching it whole once", url=fetch.shown)
            whole_again = True
            await _disk(part.truncate)
            continue
        raise ChecksumMismatch(expected=expected, actual=actual)
    await _disk(part.finish)
    log.info("download complete", url=fetch.shown, size=part.length)
