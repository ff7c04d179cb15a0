"""Wrap the transports a reader scheme opens, through the reader-scheme registry (the seam the
runtime offers for this), instead of patching a module's global: every card link the agent
opens for that scheme goes through ``wrap(inner)`` while the context is active."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from est_agent.transport.base import CardTransport
from est_agent.transport.registry import reader_factory, register_reader_scheme

__all__ = ["wrapped_reader_scheme"]


@contextlib.contextmanager
def wrapped_reader_scheme(
    name: str, wrap: Callable[[CardTransport], CardTransport]
) -> Iterator[None]:
    real = reader_factory(name)
    assert real is not None, f"no {name}: reader scheme registered"
    register_reader_scheme(name, lambda rest: wrap(real(rest)))
    try:
        yield
    finally:
        register_reader_scheme(name, real)
