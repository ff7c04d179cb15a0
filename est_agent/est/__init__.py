"""EST (RFC 7030 / RFC 8951): pure message codecs, the card-backed TLS transport and the client."""

import sys

# httpx's package __init__ imports its command-line client (``httpx._main``: rich, click and
# pygments) whenever those happen to be installed, as they are beside the dev tools: ≈ 5 MiB and
# ≈ 30 ms of every enrollment (issue 16), for a `main` the agent never calls. A None entry in
# sys.modules makes that import raise ImportError (Python Language Reference §5.3.1, "The
# module cache"), and httpx then defines the stub `main` it uses when they are absent; nothing
# else of httpx changes. Only before httpx's first import: a process that has loaded it keeps it
# as it is.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None: see above
