"""agent.download against a real HTTP server on loopback that drops, fails and changes."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, DownloadSettings, load_config
from agent.download import check_url, download, redact_text, redact_url
from agent.errors import ChecksumMismatch, DownloadFailed, InvalidPayload, PayloadTooLarge
from tests.certs import make_pki
from tests.httpserver import file_server

if TYPE_CHECKING:
    from tests.httpserver import FileServer

pytestmark = pytest.mark.anyio

SIZE = 300_000
CONTENT = os.urandom(SIZE)
SHA = hashlib.sha256(CONTENT).hexdigest()
WAIT = 30


class Progress:
    """Collects progress(received, total) calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, received: int, total: int | None) -> None:
        self.calls.append((received, total))


async def fetch(
    files: FileServer,
    part: Path,
    *,
    url: str | None = None,
    sha256: str = SHA,
    size: int | None = SIZE,
    settings: DownloadSettings | None = None,
) -> Progress:
    progress = Progress()
    with anyio.fail_after(WAIT):
        await download(
            url or files.url,
            part,
            sha256=sha256,
            size=size,
            settings=settings or DownloadSettings(timeout=20),
            progress=progress,
        )
    return progress


def served_per_request(files: FileServer) -> list[tuple[int, int, str | None]]:
    with files.lock:
        return [(r.status, r.body_bytes, r.headers.get("range")) for r in files.requests]


# --- fetching and resuming -------------------------------------------------------------------


async def test_whole_download_reports_progress(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT) as files:
        progress = await fetch(files, part)
    assert part.read_bytes() == CONTENT
    assert files.served == SIZE
    received = [r for r, _ in progress.calls]
    assert received == sorted(received)
    assert progress.calls[-1] == (SIZE, SIZE)


async def test_a_dropped_connection_resumes_with_range_and_if_range(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, plan=[("drop", 100_000)]) as files:
        await fetch(files, part)
        requests = served_per_request(files)
        if_range = files.requests[1].headers.get("if-range")
    assert part.read_bytes() == CONTENT
    assert requests == [(200, 100_000, None), (206, SIZE - 100_000, "bytes=100000-")]
    assert if_range == '"v1"'
    assert files.served == SIZE  # only the rest was fetched again


async def test_a_later_call_resumes_what_an_earlier_one_left(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with (
        file_server(CONTENT, plan=[("drop", 120_000), ("status", 404)]) as files,
        pytest.raises(DownloadFailed) as failed,
    ):
        await fetch(files, part)
    assert failed.value.status == 404
    assert part.stat().st_size == 120_000  # kept, to resume
    with file_server(CONTENT) as files:
        await fetch(files, part)
        requests = served_per_request(files)
    assert requests == [(206, SIZE - 120_000, "bytes=120000-")]
    assert part.read_bytes() == CONTENT


async def test_a_cancelled_download_keeps_every_byte_it_received(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    big = os.urandom(3_000_000)
    seen: list[int] = []
    with file_server(big) as files:
        with anyio.CancelScope() as scope:

            def stop_halfway(received: int, total: int | None) -> None:
                seen.append(received)
                if received >= 1_000_000:
                    scope.cancel()

            await download(
                files.url,
                part,
                sha256=hashlib.sha256(big).hexdigest(),
                size=len(big),
                settings=DownloadSettings(timeout=20),
                progress=stop_halfway,
            )
        kept = part.stat().st_size
        assert kept == seen[-1]  # what arrived before the cancel is on disk, nothing else
        assert 1_000_000 <= kept < len(big)
        before = len(files.requests)
        await fetch(files, part, sha256=hashlib.sha256(big).hexdigest(), size=len(big))
        resumed = served_per_request(files)[before:]
    assert resumed == [(206, len(big) - kept, f"bytes={kept}-")]
    assert part.read_bytes() == big


async def test_a_server_that_ignores_range_restarts_from_zero(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, honour_range=False, plan=[("drop", 50_000)]) as files:
        await fetch(files, part)
        requests = served_per_request(files)
    assert requests == [(200, 50_000, None), (200, SIZE, "bytes=50000-")]
    assert part.read_bytes() == CONTENT


async def test_a_changed_etag_fetches_the_object_again(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with (
        file_server(CONTENT, plan=[("drop", 70_000), ("status", 410)]) as files,
        pytest.raises(DownloadFailed, match="410"),
    ):
        await fetch(files, part)
    with file_server(CONTENT, etag='"v2"') as files:
        await fetch(files, part)
        requests = served_per_request(files)
        sent = files.requests[0].headers.get("if-range")
    assert sent == '"v1"'
    assert requests == [(200, SIZE, "bytes=70000-")]  # the server saw the old validator
    assert part.read_bytes() == CONTENT


async def test_last_modified_is_the_validator_without_a_strong_etag(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    stamp = "Wed, 02 Dec 2026 10:00:00 GMT"
    with file_server(
        CONTENT, etag='W/"weak"', last_modified=stamp, plan=[("drop", 10_000)]
    ) as files:
        await fetch(files, part)
        sent = files.requests[1].headers.get("if-range")
    assert sent == stamp
    assert part.read_bytes() == CONTENT


async def test_an_already_complete_part_is_answered_416_and_accepted(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with (
        file_server(CONTENT, plan=[("drop", SIZE - 1), ("status", 404)]) as files,
        pytest.raises(DownloadFailed),
    ):
        await fetch(files, part)
    part.write_bytes(CONTENT)  # as if the last byte had arrived just before the cut
    with file_server(CONTENT) as files:
        await fetch(files, part)
        requests = served_per_request(files)
    assert requests == [(416, 0, f"bytes={SIZE}-")]


async def test_a_part_without_its_sidecar_is_fetched_afresh(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    part.write_bytes(b"left over from something else")
    with file_server(CONTENT) as files:
        await fetch(files, part)
        requests = served_per_request(files)
    assert requests == [(200, SIZE, None)]
    assert part.read_bytes() == CONTENT


# --- retries and final errors ----------------------------------------------------------------


async def test_a_500_is_retried(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, plan=[("status", 500), ("status", 503)]) as files:
        await fetch(files, part)
        statuses = [s for s, _, _ in served_per_request(files)]
    assert statuses == [500, 503, 200]
    assert part.read_bytes() == CONTENT


async def test_a_stalled_answer_times_out_and_is_retried(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    # download.timeout 8 s gives each read 2 s
    with file_server(CONTENT, plan=[("stall", 4)]) as files:
        await fetch(files, part, settings=DownloadSettings(timeout=8))
        assert len(files.requests) == 2
    assert part.read_bytes() == CONTENT


@pytest.mark.parametrize(
    ("status", "words"), [(404, "no such object"), (410, "removed"), (401, "401"), (400, "400")]
)
async def test_a_4xx_is_final(tmp_path: Path, status: int, words: str) -> None:
    part = tmp_path / "m.part"
    with (
        file_server(CONTENT, always_status=status) as files,
        pytest.raises(DownloadFailed) as failed,
    ):
        await fetch(files, part)
    assert len(files.requests) == 1  # not retried
    assert failed.value.code == "download_failed"
    assert failed.value.status == status
    assert words in failed.value.message


async def test_a_403_on_an_expired_presigned_url_says_so(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, always_status=403) as files:
        url = (
            f"{files.url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z"
            "&X-Amz-Expires=3600&X-Amz-Signature=deadbeefsecret"
        )
        with pytest.raises(DownloadFailed) as failed:
            await fetch(files, part, url=url)
        with pytest.raises(DownloadFailed) as forbidden:
            await fetch(files, part)
    assert "presigned URL expired at 2026-01-01T01:00:00Z" in failed.value.message
    assert "deadbeefsecret" not in failed.value.message
    assert "X-Amz" not in failed.value.message
    assert "presigned URL also answers so" in forbidden.value.message
    assert len(files.requests) == 2  # neither was retried


async def test_retries_stop_at_the_timeout(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, always_status=502) as files, pytest.raises(DownloadFailed) as failed:
        await fetch(files, part, settings=DownloadSettings(timeout=1.5))
    assert len(files.requests) >= 2
    assert failed.value.status == 502
    assert "download.timeout (1.5 s)" in failed.value.message
    assert "HTTP 502" in failed.value.message


async def test_a_connection_refused_is_retried_until_the_timeout(tmp_path: Path) -> None:
    with file_server(CONTENT) as files:
        url = files.url
    with pytest.raises(DownloadFailed, match="ConnectError"):
        await fetch_url(url, tmp_path / "m.part", DownloadSettings(timeout=1))


async def fetch_url(url: str, part: Path, settings: DownloadSettings) -> None:
    with anyio.fail_after(WAIT):
        await download(url, part, sha256=SHA, size=SIZE, settings=settings, progress=Progress())


# --- wrong content and size limits -----------------------------------------------------------


async def test_wrong_content_is_a_checksum_mismatch_and_is_discarded(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    other = os.urandom(SIZE)
    with file_server(other) as files, pytest.raises(ChecksumMismatch) as failed:
        await fetch(files, part)
    assert failed.value.expected == SHA
    assert failed.value.actual == hashlib.sha256(other).hexdigest()
    assert not part.exists()
    assert not part.with_name("m.part.meta").exists()


async def test_pieces_of_two_versions_are_fetched_whole_once(tmp_path: Path) -> None:
    # no validator at all: the resume cannot tell the object changed; the hash does
    part = tmp_path / "m.part"
    changed = bytearray(CONTENT)
    changed[:1000] = os.urandom(1000)
    with (
        file_server(bytes(changed), etag=None, plan=[("drop", 5000), ("status", 404)]) as files,
        pytest.raises(DownloadFailed),
    ):
        await fetch(files, part)
    with file_server(CONTENT, etag=None) as files:
        await fetch(files, part)
        requests = served_per_request(files)
    assert requests == [(206, SIZE - 5000, "bytes=5000-"), (200, SIZE, None)]
    assert part.read_bytes() == CONTENT


async def test_a_size_above_the_limit_is_refused_before_any_request(tmp_path: Path) -> None:
    with file_server(CONTENT) as files:
        with pytest.raises(PayloadTooLarge) as failed:
            await fetch(
                files, tmp_path / "m.part", settings=DownloadSettings(max_model_bytes=100_000)
            )
        assert files.requests == []
    assert (failed.value.size, failed.value.limit) == (SIZE, 100_000)


async def test_a_content_length_above_the_limit_is_refused_early(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT) as files, pytest.raises(PayloadTooLarge) as failed:
        await fetch(files, part, size=None, settings=DownloadSettings(max_model_bytes=100_000))
    assert failed.value.size == SIZE
    assert not part.exists()


async def test_reading_stops_past_the_limit_without_a_content_length(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, send_length=False) as files, pytest.raises(PayloadTooLarge) as failed:
        await fetch(files, part, size=None, settings=DownloadSettings(max_model_bytes=100_000))
    assert failed.value.size > 100_000
    assert failed.value.limit == 100_000
    assert not part.exists()


async def test_a_server_copy_of_another_size_is_refused(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT) as files:
        with pytest.raises(
            DownloadFailed, match=f"the server's copy is {SIZE} bytes; model_size is 1000"
        ):
            await fetch(files, part, size=1000)
        assert len(files.requests) == 1
    assert not part.exists()


async def test_without_a_length_the_size_is_checked_at_the_end(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with (
        file_server(CONTENT[:1000], send_length=False) as files,
        pytest.raises(DownloadFailed, match="received 1000 bytes; model_size is 300000"),
    ):
        await fetch(files, part)


async def test_a_sha256_in_upper_case_is_accepted(tmp_path: Path) -> None:
    with file_server(CONTENT) as files:
        await fetch(files, tmp_path / "m.part", sha256=SHA.upper())


# --- URLs: allowed prefixes, redirects, redaction --------------------------------------------


async def test_a_redirect_outside_the_allowed_prefixes_is_refused(tmp_path: Path) -> None:
    with file_server(CONTENT) as target, file_server(b"", redirect_to=target.url) as hop:
        allowed = DownloadSettings(allowed_url_prefixes=(f"http://127.0.0.1:{hop.port}/",))
        with pytest.raises(DownloadFailed, match="redirected to a refused URL"):
            await fetch(hop, tmp_path / "m.part", settings=allowed)
        assert target.requests == []
        both = DownloadSettings(
            allowed_url_prefixes=(
                f"http://127.0.0.1:{hop.port}/",
                f"http://127.0.0.1:{target.port}/",
            )
        )
        await fetch(hop, tmp_path / "m.part", settings=both)
    assert (tmp_path / "m.part").read_bytes() == CONTENT


async def test_no_credentials_in_logs_or_errors(tmp_path: Path) -> None:
    part = tmp_path / "m.part"
    with file_server(CONTENT, plan=[("status", 500)], always_status=None) as files:
        secret_url = files.url.replace("http://", "http://alice:hunter2@") + "?token=s3cr3t#frag"
        with structlog.testing.capture_logs() as logs:
            await fetch(files, part, url=secret_url)
        files.always_status = 404
        part.unlink()
        with pytest.raises(DownloadFailed) as failed:
            await fetch(files, tmp_path / "n.part", url=secret_url)
        sent = files.requests[0].headers.get("authorization")
    assert sent is not None  # the credentials were used...
    text = repr(logs) + failed.value.message + repr(failed.value.url)
    for secret in ("hunter2", "alice", "s3cr3t", "token", "frag"):  # ...and never shown
        assert secret not in text
    assert any(entry["event"] == "download retry" for entry in logs)
    assert f"127.0.0.1:{files.port}/models/m.blob" in failed.value.message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/m.blob", "not an http or https URL"),
        ("file:///etc/passwd", "not an http or https URL"),
        ("https:///m.blob", "names no host"),
        ("https://example.com/a b", "space or a control character"),
        ("https://[::1/m.blob", "not a valid URL"),
        ("models/m.blob", "not an http or https URL"),
        ("https://other.example.com/m.blob", "not under download.allowed_url_prefixes"),
        ("https://models.example.com.evil.net/m.blob", "not under download.allowed_url_prefixes"),
        ("https://models.example.com@evil.net/m.blob", "not under download.allowed_url_prefixes"),
    ],
)
def test_check_url_refuses(url: str, reason: str) -> None:
    settings = DownloadSettings(allowed_url_prefixes=("https://models.example.com/",))
    with pytest.raises(InvalidPayload) as refused:
        check_url(url, settings)
    assert reason in refused.value.message
    assert refused.value.path == "$.model_url"


def test_check_url_accepts_by_default_any_http_url() -> None:
    check_url("http://anything.example:8080/m.blob?sig=1", DownloadSettings())
    check_url(
        "https://models.example.com/fleet/m.blob",
        DownloadSettings(allowed_url_prefixes=("https://models.example.com/",)),
    )


def test_check_url_quotes_the_url_redacted() -> None:
    with pytest.raises(InvalidPayload) as refused:
        check_url("ftp://bob:pw@host/x?key=secret", DownloadSettings())
    assert "secret" not in refused.value.message
    assert "pw" not in refused.value.message


def test_redact_url_examples() -> None:
    assert redact_url("https://u:p@host:8443/a/b?X-Amz-Signature=1#f") == "https://host:8443/a/b"
    assert redact_url("https://host/a@b/c") == "https://host/a@b/c"  # an @ in the path stays
    assert redact_url("user:pw@host/x?q") == "host/x"
    # some parsers read a backslash as a slash; dropping up to the last @ hides more, not less
    assert redact_url("https://host\\@u:p@evil/x") == "https://evil/x"
    assert redact_text("GET https://u:p@h/x?s=1 failed") == "GET https://h/x failed"


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=3, max_size=20)


@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "s3", ""]),
    user=_word,
    password=_word,
    host=st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True),
    path=_text,
    query=_text,
    fragment=_text,
)
def test_redaction_drops_userinfo_query_and_fragment(
    scheme: str, user: str, password: str, host: str, path: str, query: str, fragment: str
) -> None:
    path = "/" + path.replace("?", "").replace("#", "")
    url = f"{scheme}://{user}:{password}@{host}{path}?secret={query}#{fragment}"
    shown = redact_url(url)
    assert f"{user}:{password}@" not in shown
    assert "?" not in shown
    assert "#" not in shown
    assert "secret=" not in shown
    assert shown == f"{scheme}://{host}{path}"


@given(
    user=_word,
    password=_word,
    host=st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True),
    path=st.from_regex(r"[A-Za-z0-9/._~%-]{0,40}", fullmatch=True),
    query=_word,
)
def test_redact_text_redacts_every_url_in_a_message(
    user: str, password: str, host: str, path: str, query: str
) -> None:
    url = f"https://{user}:{password}@{host}/{path}?sig={query}"
    text = redact_text(f"error at {url} then at ({url}) gone")
    assert text == f"error at https://{host}/{path} then at (https://{host}/{path} gone"


@given(st.text(max_size=300))
def test_redaction_takes_any_text(text: str) -> None:
    shown = redact_url(text)
    assert "?" not in shown
    assert "#" not in shown
    assert len(shown) <= len(text)
    redact_text(text)


@given(
    st.one_of(
        st.text(max_size=200), st.from_regex(r"(?i)(https?|ftp)://[^\s]{0,80}", fullmatch=True)
    )
)
def test_check_url_raises_only_invalid_payload(url: str) -> None:
    settings = DownloadSettings(allowed_url_prefixes=("https://models.example.com/",))
    for each in (settings, DownloadSettings()):
        try:
            check_url(url, each)
        except InvalidPayload as refused:
            path: str | None = refused.path
        else:
            path = None
        if path is not None:
            assert path == "$.model_url"
            continue
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        assert scheme in ("http", "https")
        if each.allowed_url_prefixes:
            assert url.startswith("https://models.example.com/")


# --- config ----------------------------------------------------------------------------------


def test_download_config_section(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[download]\nallowed_url_prefixes = ["https://models.example.com/fleet/"]\n'
        'ca_file = "ca.pem"\ntimeout = 120\nmax_model_bytes = 50_000_000\n'
    )
    config = load_config(path)
    assert config.download.allowed_url_prefixes == ("https://models.example.com/fleet/",)
    assert config.download.ca_file == str(tmp_path / "ca.pem")
    assert (config.download.timeout, config.download.max_model_bytes) == (120, 50_000_000)
    assert load_config(_write(tmp_path, "")).download == DownloadSettings()


@pytest.mark.parametrize(
    "body",
    [
        'allowed_url_prefixes = ["https://models.example.com"]',  # no slash after the host
        'allowed_url_prefixes = ["ftp://models.example.com/"]',
        'allowed_url_prefixes = ["https://u@models.example.com/"]',
        "timeout = 0",
        "max_model_bytes = 10",
        "retries = 3",
    ],
)
def test_bad_download_config_is_refused(tmp_path: Path, body: str) -> None:
    with pytest.raises(ConfigError, match="download"):
        load_config(_write(tmp_path, f"[download]\n{body}\n"))


def _write(folder: Path, text: str) -> Path:
    path = folder / "agent.toml"
    path.write_text(text)
    return path


def test_settings_are_a_frozen_struct() -> None:
    settings = DownloadSettings()
    assert settings.timeout == 600
    assert settings.max_model_bytes == 256 * 1024 * 1024
    assert msgspec.structs.asdict(settings)["allowed_url_prefixes"] == ()


async def test_download_checks_the_url_first(tmp_path: Path) -> None:
    settings = DownloadSettings(allowed_url_prefixes=("https://models.example.com/",))
    with pytest.raises(InvalidPayload, match="allowed_url_prefixes"):
        await download(
            "http://127.0.0.1:9/m.blob",
            tmp_path / "m.part",
            sha256=SHA,
            size=None,
            settings=settings,
            progress=Progress(),
        )
    assert not (tmp_path / "m.part").exists()


def test_the_example_config_documents_every_download_key(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
    text = example.read_text()
    section = text[text.index("[download]") :].split("\n\n", 1)[0]
    settings = re.compile(r"# ([a-z_]+ = .*)")
    uncommented = "\n".join(
        found.group(1) if (found := settings.fullmatch(line)) else line
        for line in section.splitlines()
    )
    config = load_config(_write(tmp_path, uncommented))
    keys = set(msgspec.structs.asdict(config.download))
    assert keys == {f.name for f in msgspec.structs.fields(DownloadSettings)}
    assert config.download != DownloadSettings()  # every example value was read
    assert all(f"{key} =" in section for key in keys)


async def test_a_redirect_loop_is_final(tmp_path: Path) -> None:
    with file_server(b"") as hop:
        hop.redirect_to = hop.url
        with pytest.raises(DownloadFailed, match="more than 5 redirects"):
            await fetch(hop, tmp_path / "m.part")
    assert len(hop.requests) == 6


async def test_https_with_the_configured_ca_file(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with file_server(CONTENT, tls=(pki.broker_cert, pki.broker_key)) as files:
        await fetch(files, tmp_path / "m.part", settings=DownloadSettings(ca_file=str(pki.ca)))
        assert (tmp_path / "m.part").read_bytes() == CONTENT
        untrusted = DownloadSettings(ca_file=str(pki.other_ca), timeout=20)
        with pytest.raises(DownloadFailed, match="certificate is not trusted by") as failed:
            await fetch(files, tmp_path / "n.part", settings=untrusted)
    assert str(pki.other_ca) in failed.value.message
    assert len(files.requests) == 1  # the untrusted one never got a request through, nor a retry
