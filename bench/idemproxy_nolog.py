"""``idemproxy run`` with the per-request access log switched off (benchmark only).

The shipped CLI always logs one JSON line per request on stderr. To price that line, the
benchmark runs this wrapper: the same ``idemproxy.cli.main``, but after logging is set up the
``idemproxy.access`` logger is raised to WARNING, so ``Trace.finish`` skips the line entirely
(no formatting, no write). Events (start, stop, errors) still go to stderr.

    python bench/idemproxy_nolog.py run --upstream URL --store URL --listen ... --admin ...
"""

from __future__ import annotations

import logging
import sys

from idemproxy import cli
from idemproxy.observability import LogFormat, setup_logging


def _setup_without_access_log(log_format: LogFormat) -> None:
    setup_logging(log_format)
    logging.getLogger("idemproxy.access").setLevel(logging.WARNING)


if __name__ == "__main__":
    # cli imported setup_logging by name: replace it in cli's namespace
    vars(cli)["setup_logging"] = _setup_without_access_log
    sys.exit(cli.main())
