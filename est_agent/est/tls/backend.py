"""The httpcore network backend of the EST transport, and its streams (httpcore's ``_backends``).

* ``Deadline``: one request's time budget, end to end, frozen while the card signs.
* ``ConnectionState``: what the streams and the transport share (the request's deadline, the
  live stream and its channel binding, the pin that forbids a new connection).
* ``EstNetworkBackend.connect_tcp`` opens the TCP connection: to the server, or to the HTTP
  proxy, which is asked with CONNECT (RFC 9110 §9.3.6) for a tunnel to the server
  (``_open_tunnel``) before any TLS, so the handshake, its channel binding and every request
  run end to end with the server inside the tunnel. On the tlslite path
  ``_TcpStream.start_tls`` runs tlslite-ng (through tlslite_adapter.py) and returns a
  ``_TlsliteStream``; on the stdlib path httpcore's own stream is wrapped (``_StdlibStream``).
* Every socket operation waits at most min(its own timeout, the time left of the request).

Errors leave the streams as httpcore's connection errors (transient: the transport maps them to
``EstConnectionError``) or typed already: ``TlsVerificationError`` (server not authenticated,
handshake failed), ``AuthError`` (the server refused our certificate with a certificate alert;
the proxy refused its credentials, 407), ``EstConnectionError`` (the proxy refused the tunnel),
``EstError`` (the proxy answered something that is not HTTP). Messages say what happened, never
which class.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

import h11
import httpcore

from est_agent.errors import (
    AuthError,
    EstAgentError,
    EstConnectionError,
    EstError,
    TlsVerificationError,
)
from est_agent.est.proxy import HttpsProxy, authority
from est_agent.est.tls import tlslite_adapter
from est_agent.est.tls.config import StdlibTls, TlsliteTls
from est_agent.est.tls.policy import (
    CLIENT_CERT_ALERT_NAMES,
    CLIENT_CERT_ALERTS,
    CLOSE_ALERTS,
    TLS_EXPORTER_LABEL,
    TLS_EXPORTER_LENGTH,
    ChannelBinding,
)

__all__ = [
    "ConnectionChangedError",
    "ConnectionState",
    "Deadline",
    "DeadlineExceeded",
    "EstNetworkBackend",
    "channel_binding_of",
]

_DEADLINE_SLACK_S = 0.05  # a socket timeout set to the time left ends within this of it
_WRITE_CHUNK = 16384  # one TLS record's worth: each send gets its own (clamped) timeout
# The proxy's answer to CONNECT: status line and header fields, at most this many bytes (h11
# refuses a longer head, as a garbage answer).
_MAX_PROXY_HEAD = 16384


class ConnectionChangedError(EstConnectionError):
    """Raised when a request would need a new TLS connection while the transport is pinned
    (the CSR is bound to the old connection and must be signed again)."""


class DeadlineExceeded(TimeoutError):
    """Raised inside the transport when a request's deadline has run out (it leaves the
    transport as ``EstConnectionError``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"request not complete in {seconds:g} s")
        self.seconds = seconds


class Deadline:
    """The time budget of one request: ``remaining()`` seconds, frozen while ``paused()``.

    One deadline covers connect, handshake, sending and the whole response body; the time the
    card spends signing is excluded (``paused()``), as the card has its own APDU timeouts.
    ``clock`` is a monotonic clock in seconds, injectable for tests.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"a deadline needs a positive number of seconds, not {seconds}")
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds
        self._paused_at: float | None = None
        self._pauses = 0

    def remaining(self) -> float:
        now = self._paused_at if self._paused_at is not None else self._clock()
        return max(0.0, self._end - now)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The clock stops inside (nested pauses count once)."""
        if self._pauses == 0:
            self._paused_at = self._clock()
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0 and self._paused_at is not None:
                self._end += self._clock() - self._paused_at
                self._paused_at = None

    def clamp(self, timeout: float | None) -> float:
        """The timeout for one socket operation: ``min(timeout, remaining())``.

        Raises ``DeadlineExceeded`` when nothing is left (a zero socket timeout would mean
        non-blocking, not "expired").
        """
        left = self.remaining()
        if left <= 0.0:
            raise DeadlineExceeded(self.seconds)
        return left if timeout is None else min(timeout, left)


class ConnectionState:
    """What the streams and the transport share about the one keep-alive connection.

    ``deadline``: the current request's (None between requests); ``connections_opened``:
    TCP connections so far; ``stream`` / ``channel_binding``: the most recently established
    TLS connection; ``is_pinned``: no new connection may be opened; ``proxy``: every
    connection is tunnelled through it (None: direct).
    """

    def __init__(self, tls: TlsliteTls | StdlibTls, proxy: HttpsProxy | None = None) -> None:
        self.tls = tls
        self.proxy = proxy
        self.deadline: Deadline | None = None
        self.connections_opened = 0
        self.stream: httpcore.NetworkStream | None = None
        self.channel_binding: ChannelBinding | None = None
        self.is_pinned = False

    def op_timeout(self, timeout: float | None) -> float | None:
        """A socket operation's timeout: ``timeout``, clamped to the request's time left."""
        deadline = self.deadline
        return timeout if deadline is None else deadline.clamp(timeout)

    def timeout_message(self, what: str, timeout: float | None) -> str:
        deadline = self.deadline
        if deadline is not None and deadline.remaining() <= _DEADLINE_SLACK_S:
            return f"request not complete in {deadline.seconds:g} s ({what})"
        return f"{what}: no progress in {timeout:g} s" if timeout else f"{what}: timed out"

    def card_time(self) -> contextlib.AbstractContextManager[None]:
        """Around a card signature: the request deadline stands still."""
        deadline = self.deadline
        return deadline.paused() if deadline is not None else contextlib.nullcontext()

    def note_stream(self, stream: httpcore.NetworkStream, binding: ChannelBinding | None) -> None:
        self.stream = stream
        self.channel_binding = binding


def channel_binding_of(ssl_object: Any) -> ChannelBinding | None:
    """tls-unique (TLS 1.2) or tls-exporter (TLS 1.3) of a live connection, when available."""
    if ssl_object is None:
        return None
    version = ssl_object.version()
    if version == "TLSv1.2":
        value = ssl_object.get_channel_binding("tls-unique")
        return ChannelBinding("tls-unique", bytes(value), version) if value else None
    if version == "TLSv1.3" and isinstance(ssl_object, tlslite_adapter.TlsliteSslObject):
        value = ssl_object.export_keying_material(TLS_EXPORTER_LABEL, TLS_EXPORTER_LENGTH)
        return ChannelBinding("tls-exporter", value, version)
    return None  # stdlib ssl under TLS 1.3: no exporter API


# --------------------------------------------------------------------------------------------
# What went wrong, in words
# --------------------------------------------------------------------------------------------


def _what_happened(exc: BaseException) -> str:
    """A short description of a socket or TLS failure (never a class name)."""
    said = tlslite_adapter.describe(exc)
    if said is not None:
        return said
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the server closed the connection without a TLS alert"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {_openssl_alert(exc) or exc.reason or exc.strerror or 'unknown'}"
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or "socket failure"
    text = str(exc)
    # tlslite's message-less errors print as "ClassName()"
    return "TLS protocol failure" if not text or text.endswith("()") else text


def _openssl_alert(exc: ssl.SSLError) -> str | None:
    """The alert an OpenSSL error reports having received ("SSLV3_ALERT_BAD_CERTIFICATE")."""
    reason = exc.reason or ""
    return reason.split("ALERT_", 1)[1].lower() if "ALERT_" in reason else None


def _is_bare_close(exc: BaseException) -> bool:
    """The peer closed or reset the TCP connection without a TLS alert."""
    if isinstance(exc, (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True
    return tlslite_adapter.is_remote_close(exc)


def _tlslite_handshake_failure(
    host: str, exc: BaseException, alert: int | None, *, signed: bool
) -> Exception:
    """What a failed tlslite handshake means (``alert``: the alert the server sent, if any).

    Only a certificate alert (RFC 8446 §6.2: bad_certificate ... certificate_required) says
    the server refused our certificate: permanent, a retry would cost a card signature for the
    same answer. A close or reset without an alert, even right after our CertificateVerify,
    is the server shedding load or the path failing: transient (EstConnectionError).
    """
    if alert in CLIENT_CERT_ALERTS:
        return AuthError(
            f"{host} refused the TLS client certificate "
            f"(TLS alert {tlslite_adapter.alert_name(alert)})"
        )
    if alert is not None and alert not in CLOSE_ALERTS:
        return TlsVerificationError(
            f"TLS handshake with {host} failed: the server sent the TLS alert "
            f"{tlslite_adapter.alert_name(alert)}"
        )
    what = _what_happened(exc)
    if _is_bare_close(exc):
        if signed:
            what += " after our certificate was sent (transient: a refusal comes with an alert)"
        return httpcore.ConnectError(f"TLS handshake with {host}: {what}")
    if isinstance(exc, OSError):
        return httpcore.ConnectError(f"TLS handshake with {host}: {what}")
    return TlsVerificationError(f"TLS handshake with {host} failed: {what}")


# --------------------------------------------------------------------------------------------
# tlslite-ng streams
# --------------------------------------------------------------------------------------------


class _BoundedSocket:
    """The socket tlslite reads and writes: every recv/send waits at most ``timeout`` (the
    current operation's, from httpcore) and never past the request's deadline.

    A write the peer cuts short (EPIPE, ECONNRESET) is noted in ``write_failure`` and
    reported as done: a server refusing our certificate sends its alert and closes while we
    are still writing (OpenSSL judges our Certificate as it arrives; under TLS 1.3 the alert
    is encrypted), and the kernel keeps what it received readable after the reset. So the
    next read gets the alert, and the verdict, instead of it dying with the write.
    """

    def __init__(self, sock: socket.socket, state: ConnectionState) -> None:
        self.sock = sock
        self.timeout: float | None = None
        self.write_failure: ConnectionError | None = None
        self._state = state

    def _arm(self) -> None:
        self.sock.settimeout(self._state.op_timeout(self.timeout))

    def recv(self, size: int) -> bytes:
        self._arm()
        return self.sock.recv(size)

    def send(self, data: bytes) -> int:
        if self.write_failure is None:
            self._arm()
            try:
                return self.sock.send(data)
            except ConnectionError as exc:
                self.write_failure = exc
        return len(data)

    def sendall(self, data: bytes) -> None:
        if self.write_failure is None:
            self._arm()
            try:
                self.sock.sendall(data)
            except ConnectionError as exc:
                self.write_failure = exc

    def close(self) -> None:
        self.sock.close()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    def gettimeout(self) -> float | None:
        return self.timeout

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.sock.setsockopt(level, option, value)


class _TcpStream(httpcore.NetworkStream):
    """A TCP socket; ``start_tls`` runs tlslite (tlslite path) and returns ``_TlsliteStream``."""

    def __init__(self, sock: socket.socket, config: TlsliteTls, state: ConnectionState) -> None:
        self._sock = sock
        self._config = config
        self._state = state

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        raise httpcore.ReadError("plain-text HTTP is refused")  # https only

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        raise httpcore.WriteError("plain-text HTTP is refused")

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        return self._sock if info == "socket" else None

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        host = server_hostname or ""
        state = self._state
        bounded = _BoundedSocket(self._sock, state)
        bounded.timeout = timeout
        try:
            connection = tlslite_adapter.handshake(
                bounded, self._config, host, card_time=state.card_time
            )
        except TlsVerificationError:
            self._sock.close()
            raise
        except TimeoutError as exc:
            self._sock.close()
            raise httpcore.ConnectTimeout(
                state.timeout_message(f"TLS handshake with {host}", timeout)
            ) from exc
        except tlslite_adapter.HandshakeFailed as failed:
            self._sock.close()
            cause = failed.cause
            raise _tlslite_handshake_failure(
                host, cause, failed.alert, signed=failed.signed
            ) from cause
        stream = _TlsliteStream(self._sock, bounded, connection, state)
        state.note_stream(stream, channel_binding_of(connection.ssl_object))
        return stream


class _TlsliteStream(httpcore.NetworkStream):
    def __init__(
        self,
        sock: socket.socket,
        bounded: _BoundedSocket,
        connection: tlslite_adapter.ClientConnection,
        state: ConnectionState,
    ) -> None:
        self._sock = sock
        self._bounded = bounded
        self._connection = connection
        self._state = state
        self.ssl_object = connection.ssl_object
        self.closed = False
        # TLS 1.3 (RFC 8446 §4.4.2): the server judges our Certificate only after the client
        # has finished the handshake, so its verdict shows up on the first write or read.
        self._judged_late = connection.client_auth and self.ssl_object.version() == "TLSv1.3"
        self._answered = False
        #: what a failed read or write raises: the socket's errors and tlslite's
        self._failures: tuple[type[Exception], ...] = (OSError, *tlslite_adapter.tls_errors())

    def _failure(self, exc: BaseException, *, reading: bool) -> Exception:
        """The exception a failed read or write leaves with.

        A certificate alert is a refusal (AuthError, permanent); under TLS 1.3 before any
        answer, another fatal alert ends the handshake (TlsVerificationError); a close or
        reset without an alert is a connection failure httpcore reports (transient).
        """
        alert = tlslite_adapter.remote_alert(exc)
        if alert in CLIENT_CERT_ALERTS:
            return AuthError(
                "the server refused the TLS client certificate "
                f"(TLS alert {tlslite_adapter.alert_name(alert)})"
            )
        early = self._judged_late and not self._answered
        if alert is not None and alert not in CLOSE_ALERTS and early:
            return TlsVerificationError(
                "the server ended the TLS 1.3 handshake with the TLS alert "
                f"{tlslite_adapter.alert_name(alert)}"
            )
        what = _what_happened(exc)
        if early and _is_bare_close(exc):
            what += " right after the handshake (transient: a refusal comes with an alert)"
        return httpcore.ReadError(what) if reading else httpcore.WriteError(what)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._bounded.timeout = timeout
        try:
            data = self._connection.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(
                self._state.timeout_message("receiving the response", timeout)
            ) from exc
        except self._failures as exc:
            if tlslite_adapter.is_abrupt_close(exc):
                cut = self._bounded.write_failure
                if cut is not None:
                    raise httpcore.ReadError(
                        f"the connection broke while sending: {_what_happened(cut)}"
                    ) from exc
                return b""  # TCP closed without close_notify: httpcore judges the truncation
            raise self._failure(exc, reading=True) from exc
        self._answered = self._answered or bool(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            # h11 hands over b"" for an empty body and its end; tlslite would send each as a
            # zero-length application_data record (RFC 8446 §5.1 lets only application data
            # be empty, never required). A server that closes after answering then sees
            # unread data, resets, and our next write or read fails: send nothing.
            return
        self._bounded.timeout = timeout
        try:
            self._connection.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(
                self._state.timeout_message("sending the request", timeout)
            ) from exc
        except self._failures as exc:
            raise self._failure(exc, reading=False) from exc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._bounded.timeout = 1.0
        with contextlib.suppress(*self._failures):
            self._connection.close()  # close_notify (RFC 8446 §6.1)
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self.ssl_object
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # An idle keep-alive connection that is readable has been closed by the server.
            return self.closed or _socket_readable(self._sock)
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        return None


def _socket_readable(sock: socket.socket) -> bool:
    import select

    if sock.fileno() < 0:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


# --------------------------------------------------------------------------------------------
# stdlib ssl stream
# --------------------------------------------------------------------------------------------


def _stdlib_failure(exc: httpcore.NetworkError, *, reading: bool) -> Exception:
    """A stdlib read/write failure: a certificate alert is a refusal, the rest in words."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError) and _openssl_alert(cause) in CLIENT_CERT_ALERT_NAMES:
        return AuthError(
            f"the server refused the TLS client certificate (TLS alert {_openssl_alert(cause)})"
        )
    what = _what_happened(cause) if cause is not None else str(exc) or "connection failed"
    return httpcore.ReadError(what) if reading else httpcore.WriteError(what)


class _StdlibStream(httpcore.NetworkStream):
    """httpcore's own sync stream, bounded by the request deadline; after ``start_tls`` the
    TLS stream is wrapped again and its channel binding noted."""

    def __init__(self, inner: httpcore.NetworkStream, state: ConnectionState) -> None:
        self._inner = inner
        self._state = state

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, self._state.op_timeout(timeout))
        except (TimeoutError, httpcore.ReadTimeout) as exc:
            raise httpcore.ReadTimeout(
                self._state.timeout_message("receiving the response", timeout)
            ) from exc
        except httpcore.ReadError as exc:
            raise _stdlib_failure(exc, reading=True) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), _WRITE_CHUNK):
            try:
                self._inner.write(
                    buffer[start : start + _WRITE_CHUNK], self._state.op_timeout(timeout)
                )
            except (TimeoutError, httpcore.WriteTimeout) as exc:
                raise httpcore.WriteTimeout(
                    self._state.timeout_message("sending the request", timeout)
                ) from exc
            except httpcore.WriteError as exc:
                raise _stdlib_failure(exc, reading=False) from exc

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        host = server_hostname
        state = self._state
        try:
            # CPython's SSLSocket.do_handshake applies the socket timeout to the whole
            # handshake (a deadline, not per read): clamped, it ends with the request's.
            tls = self._inner.start_tls(ssl_context, server_hostname, state.op_timeout(timeout))
        except (TimeoutError, httpcore.ConnectTimeout) as exc:
            raise httpcore.ConnectTimeout(
                state.timeout_message(f"TLS handshake with {host}", timeout)
            ) from exc
        except httpcore.ConnectError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise TlsVerificationError(
                    f"EST server certificate for {host!r} refused: {cause.verify_message}"
                ) from cause
            if isinstance(cause, ssl.SSLError) and not _is_bare_close(cause):
                alert = _openssl_alert(cause)
                if alert in CLIENT_CERT_ALERT_NAMES:
                    raise AuthError(
                        f"{host} refused the TLS client certificate (TLS alert {alert})"
                    ) from cause
                raise TlsVerificationError(
                    f"TLS handshake with {host} failed: "
                    + (f"the server sent the TLS alert {alert}" if alert else str(cause.reason))
                ) from cause
            what = _what_happened(cause) if cause is not None else str(exc)
            raise httpcore.ConnectError(f"TLS handshake with {host}: {what}") from exc
        stream = _StdlibStream(tls, state)
        state.note_stream(stream, channel_binding_of(tls.get_extra_info("ssl_object")))
        return stream


# --------------------------------------------------------------------------------------------
# CONNECT through an HTTP proxy
# --------------------------------------------------------------------------------------------


def _proxy_failure(exc: OSError) -> str:
    """A socket failure while talking to the proxy, in words."""
    if isinstance(exc, ConnectionResetError):
        return "the proxy reset the connection"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the proxy closed the connection"
    return _what_happened(exc)


def _challenge_schemes(values: Iterable[bytes]) -> list[str]:
    """The auth-scheme of each Proxy-Authenticate field value (RFC 9110 §11.7.1, §11.6.1), for
    the message: the first token of each value (several challenges in one field are named by
    their first)."""
    schemes = []
    for value in values:
        token = value.decode("latin-1").strip().split(" ", 1)[0].split(",", 1)[0]
        if token and token.isascii() and token.isprintable():
            schemes.append(token[:32])
    return schemes


def _proxy_refusal(proxy: HttpsProxy, target: str, response: h11.Response) -> EstAgentError:
    """A proxy's non-2xx answer to CONNECT: 407 (RFC 9110 §15.5.8) is a credentials refusal
    (AuthError, not retried); any other status says the proxy will not (403) or cannot (502,
    503, 504) reach the server: unreachable through this path (EstConnectionError)."""
    status = response.status_code
    try:
        phrase = HTTPStatus(status).phrase  # our words, not the proxy's reason text
    except ValueError:
        phrase = ""
    said = f"HTTP {status}" + (f" {phrase}" if phrase else "")
    if status == 407:
        offered = _challenge_schemes(
            value for name, value in response.headers if name == b"proxy-authenticate"
        )
        if proxy.username is None:
            problem = "asks for credentials: give the user in the proxy URL and its password "
            problem += "in est.proxy_password_file or est.proxy_password_env"
        else:
            problem = f"refused the credentials of user {proxy.username!r}"
        if offered and not any(s.lower() == "basic" for s in offered):
            problem += f" (it offers {', '.join(offered)}; the agent speaks Basic only)"
        return AuthError(f"{proxy.describe()} {problem} ({said}, CONNECT {target})")
    return EstConnectionError(f"{proxy.describe()} refused the tunnel to {target} ({said})")


def _open_tunnel(
    sock: socket.socket,
    proxy: HttpsProxy,
    target: str,
    state: ConnectionState,
    timeout: float | None,
) -> None:
    """Ask ``proxy`` (connected on ``sock``) for a tunnel to ``target`` (``host:port``, RFC 9110
    §9.3.6) and return once it answers 2xx; the socket then carries the TLS session with the
    server. Only the CONNECT request goes to the proxy in clear: the target, ``Host`` and the
    proxy's own Proxy-Authorization (RFC 9110 §11.7.2), never an EST path or credential.

    Every send and receive waits at most min(``timeout``, the request's time left): the
    CONNECT counts against the request's deadline. h11 (httpcore's HTTP/1.1 parser) reads the
    answer; 1xx answers are skipped. Bytes after a 2xx head are refused: in TLS the client
    speaks first (RFC 8446 §2), so they cannot be the server's.
    """
    phase = f"CONNECT {target} through {proxy.describe()}"
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_PROXY_HEAD)
    headers = [("Host", target)]
    credentials = proxy.authorization()
    if credentials is not None:
        headers.append(("Proxy-Authorization", credentials))
    request = connection.send(h11.Request(method="CONNECT", target=target, headers=headers))
    request = (request or b"") + (connection.send(h11.EndOfMessage()) or b"")
    closed, received = False, 0
    try:
        sock.settimeout(state.op_timeout(timeout))
        sock.sendall(request)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                sock.settimeout(state.op_timeout(timeout))
                data = sock.recv(4096)
                closed, received = not data, received + len(data)
                connection.receive_data(data)
            elif isinstance(event, h11.Response):
                answer = event
                break
            elif not isinstance(event, h11.InformationalResponse):  # 1xx: read on
                raise httpcore.ConnectError(f"{phase}: the proxy closed the connection")
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(state.timeout_message(phase, timeout)) from exc
    except OSError as exc:
        raise httpcore.ConnectError(f"{phase}: {_proxy_failure(exc)}") from exc
    except h11.RemoteProtocolError as exc:
        if closed:  # a close before a whole answer: the proxy shedding load (transient)
            raise httpcore.ConnectError(
                f"{phase}: the proxy closed the connection without a complete answer"
            ) from exc
        if received > _MAX_PROXY_HEAD:
            said = f"no end of its head in {_MAX_PROXY_HEAD} bytes"
        else:
            said = str(exc)
            said = said if len(said) <= 120 else said[:120] + "..."  # h11 quotes what it got
        raise EstError(f"{phase}: the proxy's answer is not HTTP: {said}") from exc
    if not 200 <= answer.status_code < 300:
        raise _proxy_refusal(proxy, target, answer)
    early, _ = connection.trailing_data
    if early:
        raise EstError(
            f"{phase}: the proxy sent {len(early)} bytes after its HTTP {answer.status_code}, "
            "before the TLS handshake began (in TLS the client speaks first)"
        )


class EstNetworkBackend(httpcore.NetworkBackend):
    """httpcore's network backend for the EST transport: TCP, or a CONNECT tunnel through the
    state's proxy, then tlslite-ng or stdlib TLS."""

    def __init__(self, state: ConnectionState) -> None:
        self._state = state
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        state = self._state
        if state.is_pinned:
            raise ConnectionChangedError(
                "the TLS connection closed between requests; the CSR is bound to it and must "
                "be signed again on a new connection"
            )
        state.connections_opened += 1
        proxy = state.proxy
        if proxy is None:
            peer, what = (host, port), f"connect to {host}:{port}"
        else:
            peer, what = (proxy.host, proxy.port), f"connect to {proxy.describe()}"
        tls = state.tls
        inner: httpcore.NetworkStream | None = None
        try:
            budget = state.op_timeout(timeout)
            if isinstance(tls, StdlibTls):
                inner = self._sync.connect_tcp(*peer, budget, local_address, socket_options)
                sock = inner.get_extra_info("socket")
            else:
                sock = socket.create_connection(peer, budget)
        except (TimeoutError, httpcore.ConnectTimeout) as exc:
            raise httpcore.ConnectTimeout(state.timeout_message(what, timeout)) from exc
        except httpcore.ConnectError as exc:
            raise httpcore.ConnectError(f"{what}: {exc}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{what}: {_what_happened(exc)}") from exc
        if proxy is not None:
            try:
                _open_tunnel(sock, proxy, authority(host, port), state, timeout)
            except BaseException:
                sock.close()
                raise
        if isinstance(tls, StdlibTls):
            assert inner is not None
            return _StdlibStream(inner, state)
        # Small request/response exchanges, each a few TLS records: no Nagle delay (RFC 1122
        # §4.2.3.4) waiting for the peer's delayed ACK (§4.2.3.2) between them.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _TcpStream(sock, tls, state)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported")

    def sleep(self, seconds: float) -> None:
        self._sync.sleep(seconds)
