"""The httpx transport of the EST client (httpx's ``HTTPTransport`` idea) and its error mapping.

``EstTransport`` keeps one keep-alive TLS connection (``max_connections=1``) so that the
channel binding a CSR carries stays valid for the whole exchange (RFC 7030 §3.5);
``pinned()`` forbids opening a new connection, so a CSR bound to one connection is never sent
on another. ``timeout_s`` gives each request one deadline, end to end, that stands still while
the card signs (backend.py ``Deadline``). httpcore's exceptions leave as est_agent's
(``_mapped``): ``EstConnectionError`` (transient), ``EstError`` (protocol), with what
backend.py raised typed already passing through.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import cast

import httpcore
import httpx

from est_agent.errors import ConfigError, EstAgentError, EstConnectionError, EstError
from est_agent.est.proxy import HttpsProxy
from est_agent.est.tls.backend import ConnectionState, Deadline, EstNetworkBackend
from est_agent.est.tls.config import StdlibTls, TlsliteTls
from est_agent.est.tls.policy import ChannelBinding

__all__ = ["EstTransport"]

# httpcore's connection-level errors, with the phase each names (the messages raised in
# backend.py already say what failed; httpcore's own ones get the phase in front).
_CONNECTION_ERRORS: dict[type[Exception], str] = {
    httpcore.ConnectError: "",
    httpcore.ConnectTimeout: "",
    httpcore.ReadError: "receiving the response",
    httpcore.ReadTimeout: "",
    httpcore.WriteError: "sending the request",
    httpcore.WriteTimeout: "",
    httpcore.PoolTimeout: "waiting for the connection",
    httpcore.RemoteProtocolError: "the HTTP exchange broke off",  # e.g. a body cut short
}
_STALE_CONNECTION_ERRORS = (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})


@contextlib.contextmanager
def _mapped(url: str) -> Iterator[None]:
    """httpcore's exceptions as est_agent's (httpx's ``map_httpcore_exceptions`` idea)."""
    try:
        yield
    except EstAgentError:
        raise
    except tuple(_CONNECTION_ERRORS) as exc:
        phase = next(p for cls, p in _CONNECTION_ERRORS.items() if isinstance(exc, cls))
        text = str(exc) or "timed out"
        raise EstConnectionError(f"{url}: {phase}: {text}" if phase else f"{url}: {text}") from exc
    except httpcore.UnsupportedProtocol as exc:
        raise EstError(f"{url}: {exc}") from exc
    except httpcore.ProtocolError as exc:
        raise EstError(f"{url}: HTTP protocol error: {exc}") from exc


class _ResponseStream(httpx.SyncByteStream):
    """The response body; the request's deadline ends when it is exhausted or closed."""

    def __init__(self, inner: Iterable[bytes], url: str, done: Callable[[], None]) -> None:
        self._inner = inner
        self._url = url
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        try:
            with _mapped(self._url):
                yield from self._inner
        finally:
            self._done()

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        try:
            if close is not None:
                with _mapped(self._url):
                    close()
        finally:
            self._done()


class _UnusedSslContext:
    """What httpcore gets as ``ssl_context`` on the tlslite path: it only calls
    ``set_alpn_protocols`` on it before handing it to the stream's ``start_tls``, which
    ignores it (tlslite offers no ALPN; HTTP/1.1 only)."""

    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        pass


class EstTransport(httpx.BaseTransport):
    """httpx transport over one keep-alive TLS connection (tlslite-ng or stdlib ``ssl``).

    ``connections_opened`` counts TCP connections; ``channel_binding`` is that of the most
    recently established TLS connection; ``pinned()`` forbids new connections.

    ``timeout_s``: each request, end to end (connect, handshake, sending, and reading the
    whole response body: the deadline ends when the response stream is exhausted or closed),
    must finish within this many seconds; time spent in the card's signer does not count.
    Every socket operation waits at most min(its own timeout, the time left). ``clock`` is the
    monotonic clock of those deadlines (tests inject one). ``proxy``: every connection is a
    CONNECT tunnel through it (backend.py), the deadline covering the CONNECT too.
    """

    def __init__(
        self,
        tls: TlsliteTls | StdlibTls,
        *,
        timeout_s: float | None = None,
        keepalive_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        proxy: HttpsProxy | None = None,
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"the EST request timeout must be positive, not {timeout_s}")
        self.tls = tls
        self.timeout_s = timeout_s
        self._state = ConnectionState(tls, proxy)
        self._clock = clock
        # The stdlib path's context does the verification; the tlslite path ignores the
        # context httpcore hands to start_tls, so give it a stand-in (an empty SSLContext would
        # load no CA bundle, but still costs ~1 ms and ~0.4 MiB of OpenSSL state).
        ssl_context = (
            tls.context()
            if isinstance(tls, StdlibTls)
            else cast("ssl.SSLContext", _UnusedSslContext())
        )
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            max_keepalive_connections=1,
            keepalive_expiry=keepalive_s,
            http1=True,
            http2=False,
            retries=0,  # retries belong to the EST client (it must re-sign the CSR)
            network_backend=EstNetworkBackend(self._state),
        )

    # -- connection state ---------------------------------------------------------------------
    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far."""
        return self._state.connections_opened

    @property
    def channel_binding(self) -> ChannelBinding | None:
        """The channel binding of the most recently established TLS connection."""
        return self._state.channel_binding

    @property
    def is_pinned(self) -> bool:
        """Whether a new connection is forbidden (inside ``pinned()``)."""
        return self._state.is_pinned

    def connection_alive(self) -> bool:
        """Whether the noted TLS connection is still open and idle (not closed by the peer)."""
        stream = self._state.stream
        if stream is None or getattr(stream, "closed", False):
            return False
        return not stream.get_extra_info("is_readable")

    def is_current(self, stream: object) -> bool:
        """Whether ``stream`` (a response's ``network_stream``) is the noted TLS connection."""
        return stream is not None and stream is self._state.stream

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """No new connection inside: a request that would need one raises
        ``ConnectionChangedError`` before anything is sent on it."""
        self._state.is_pinned = True
        try:
            yield
        finally:
            self._state.is_pinned = False

    # -- requests -----------------------------------------------------------------------------
    def _end_request(self) -> None:
        self._state.deadline = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise EstError(f"refusing {request.url.scheme}:// (EST needs TLS, RFC 7030 §3.3)")
        assert isinstance(request.stream, httpx.SyncByteStream)
        url = str(request.url.copy_with(query=None))
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        if self.timeout_s is not None:
            self._state.deadline = Deadline(self.timeout_s, clock=self._clock)
        try:
            response = self._send(core_request, url)
        except BaseException:
            self._end_request()
            raise
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, url, self._end_request),
            extensions=response.extensions,
        )

    def _send(self, request: httpcore.Request, url: str) -> httpcore.Response:
        opened = self.connections_opened
        try:
            with _mapped(url):
                return self._pool.handle_request(request)
        except EstConnectionError as exc:
            stale = (
                opened > 0
                and self.connections_opened == opened  # it went on a reused connection
                and not self.is_pinned
                and request.method in _IDEMPOTENT
                and isinstance(exc.__cause__, _STALE_CONNECTION_ERRORS)
            )
            if not stale:
                raise
        # RFC 9112 §9.3.1: a client may retry an idempotent request when the connection
        # closed before any answer. A keep-alive connection the server closed just as we
        # reused it is that case (it cannot be seen in advance): once, on a new connection.
        with _mapped(url):
            return self._pool.handle_request(request)

    def close(self) -> None:
        self._pool.close()
