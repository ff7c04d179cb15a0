"""One ``with`` protocol for the objects that hold a resource and free it in ``close()``.

At the bottom of the package beside ``errors``: it imports nothing of ours, so every layer (the
card transports, the virtual SIM, the test server) can use it.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing(abc.ABC):
    """``with obj:`` gives ``obj`` and calls ``obj.close()`` on the way out, whatever happened
    inside; exceptions propagate (``__exit__`` returns None)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free what the object holds; calling it again does nothing more."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
