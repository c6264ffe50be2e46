"""How to reach the broker: one builder of connection options for the daemon and the client.

`broker_options` reads what `[mqtt]` names (the password file, the TLS files) once, at start,
and turns every problem with them into a `ConfigError` naming the file. `connect_problem`
describes a failed connect caused by TLS or by refused credentials, for a log line that says
which file, which name and what the broker said.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiomqtt

from agent.config import ConfigError, with_located_files

if TYPE_CHECKING:
    from agent.config import MqttSection, TlsSection

__all__ = ["BrokerOptions", "ConnectProblem", "broker_options", "connect_problem", "read_password"]

# CONNACK: 3.1.1 return codes 4/5, MQTT 5 reason codes 134/135
_REFUSED_CREDENTIALS: Final = frozenset({4, 5, 134, 135})
_CHAIN_BOUND: Final = 8  # causes followed when looking for the error behind an error


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """Everything needed to open a connection to the broker; the password is never shown."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    transport: str = "tcp"
    websocket_path: str | None = None
    tls: TlsSection | None = None
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """host:port, with how it is reached when that is not plain TCP."""
        how = [self.transport] if self.transport != "tcp" else []
        if self.tls is not None:
            how.append("TLS" if self.tls.cert_file is None else "mutual TLS")
        return f"{self.host}:{self.port}" + (f" ({', '.join(how)})" if how else "")

    @property
    def insecure(self) -> bool:
        return self.tls is not None and self.tls.insecure_skip_verify

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `aiomqtt.Client` for this connection."""
        return {
            "hostname": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "transport": self.transport,
            "websocket_path": self.websocket_path,
            "tls_context": self.tls_context,
        }


def read_password(path: str) -> str:
    """The first line of `path`, without its line ending; ConfigError when unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"mqtt.password_file: cannot read {path}: {reason}") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"mqtt.password_file: {path} is empty; the password is its first line")
    return lines[0]


class _WatchedSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails, and keeps its TLS errors.

    paho neither closes a socket whose handshake failed (it is left to the garbage collector)
    nor reports a TLS alert read after the handshake (with TLS 1.3 a rejected client
    certificate arrives then): it logs it and reports a lost connection.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLError as exc:
            self._seen(exc)
            self.close()
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._seen(exc)
            raise

    def _seen(self, exc: ssl.SSLError) -> None:
        context = self.context
        if isinstance(context, _TlsContext):
            context.last_error = exc


class _TlsContext(ssl.SSLContext):
    """The agent's SSL context: checks `server_name` instead of the host connected to, and
    keeps the last TLS error of its latest connection (see `_WatchedSocket`).

    paho passes the host it connects to as `server_hostname`; a broker reached by address
    (or through a tunnel) presents a certificate for another name.
    """

    sslsocket_class = _WatchedSocket
    server_name: str | None = None
    last_error: ssl.SSLError | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        self.last_error = None  # a new connection
        if self.server_name is not None and "server_hostname" in kwargs:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def _tls_context(tls: TlsSection) -> ssl.SSLContext:
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.server_name = tls.server_name
    try:
        if tls.ca_file is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            context.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls.ca_file: cannot load {tls.ca_file}: {_reason(exc)}") from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.tls: cannot load the client certificate {tls.cert_file} with the key "
                f"{tls.key_file}: {_reason(exc)}"
            ) from None
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def broker_options(settings: MqttSection, *, base: Path | None = None) -> BrokerOptions:
    """Options for `settings`, reading the files it names; raise ConfigError for a bad file.

    Relative file names are located as in a config file (`agent.config.locate`), from `base`
    (the current folder by default).
    """
    settings = with_located_files(settings, base or Path.cwd())
    password = settings.password
    if settings.password_file is not None:
        password = read_password(settings.password_file)
    tls = settings.tls
    return BrokerOptions(
        host=settings.host,
        port=settings.port,
        username=settings.username,
        password=password,
        password_file=settings.password_file,
        transport=settings.transport,
        websocket_path=settings.ws_path if settings.transport == "websockets" else None,
        tls=tls,
        tls_context=None if tls is None else _tls_context(tls),
    )


@dataclass(frozen=True, slots=True)
class ConnectProblem:
    """Why a connect failed, when the cause is on our side to fix: TLS or credentials."""

    cause: str  # the same for the same cause: log it once per distinct cause
    message: str


def connect_problem(error: BaseException | None, options: BrokerOptions) -> ConnectProblem | None:
    """Describe a TLS failure or a refusal of the credentials; None for any other error."""
    chain = _chain(error)
    context = options.tls_context
    if isinstance(context, _TlsContext) and context.last_error is not None:
        chain.append(context.last_error)  # read after the handshake: paho only logged it
    for exc in chain:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return _verify_problem(exc, options)
        if isinstance(exc, ssl.SSLError):
            return _handshake_problem(exc, options)
        if isinstance(exc, aiomqtt.MqttCodeError):
            rc = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
            if rc in _REFUSED_CREDENTIALS:
                return _credentials_problem(exc, options)
            return None
    return None


def _chain(error: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and len(chain) < _CHAIN_BOUND:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _verify_problem(exc: ssl.SSLCertVerificationError, options: BrokerOptions) -> ConnectProblem:
    tls = options.tls
    trusted = tls.ca_file if tls is not None and tls.ca_file else "the system trust store"
    name = (tls.server_name if tls is not None else None) or options.host
    detail = exc.verify_message or _reason(exc)
    code = exc.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        message = (
            f"TLS: the certificate of the broker at {options.where} is not valid for the name "
            f"{name!r} ({detail}); set mqtt.tls.server_name to a name it holds"
        )
    elif code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        message = f"TLS: the certificate of the broker at {options.where} has expired ({detail})"
    else:
        message = (
            f"TLS: the certificate of the broker at {options.where} is not trusted by "
            f"{trusted} ({detail})"
        )
    return ConnectProblem(cause=f"tls-verify:{code}:{name}", message=message)


def _handshake_problem(exc: ssl.SSLError, options: BrokerOptions) -> ConnectProblem:
    tls = options.tls
    reason = _reason(exc)
    upper = reason.upper()
    if tls is not None and tls.cert_file is not None and "ALERT" in upper:
        # the broker's alert after it checked our certificate: unknown CA, expired, revoked
        message = (
            f"TLS: the broker at {options.where} refused the client certificate "
            f"{tls.cert_file} ({reason})"
        )
    elif "CERTIFICATE_REQUIRED" in upper or "HANDSHAKE_FAILURE" in upper:
        message = (
            f"TLS: the broker at {options.where} wants a client certificate "
            f"({reason}); set mqtt.tls.cert_file and key_file"
        )
    elif tls is None and "WRONG_VERSION_NUMBER" not in upper:
        message = f"TLS error talking to the broker at {options.where} ({reason})"
    elif tls is None:
        message = f"the broker at {options.where} speaks TLS; add an [mqtt.tls] section"
    else:
        message = f"TLS handshake with the broker at {options.where} failed ({reason})"
    return ConnectProblem(cause=f"tls:{reason}", message=message)


def _credentials_problem(exc: aiomqtt.MqttCodeError, options: BrokerOptions) -> ConnectProblem:
    if options.password_file is not None:
        secret = f"the password from {options.password_file}"
    elif options.password is not None:
        secret = "the password in the config"  # noqa: S105  # a description, not a password
    else:
        secret = "no password"  # noqa: S105  # a description, not a password
    who = f"username {options.username!r}" if options.username else "no username"
    return ConnectProblem(
        cause=f"credentials:{exc.rc}",
        message=(f"the broker at {options.where} refused the credentials ({who}, {secret}): {exc}"),
    )


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
