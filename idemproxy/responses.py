"""Responses that carry exactly the headers they were given."""

from __future__ import annotations

from aiohttp import hdrs, web

_FILLED_IN = (hdrs.CONTENT_TYPE, hdrs.SERVER)


class VerbatimResponse(web.Response):
    """A response that carries the upstream's headers as they were.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own ``Server`` when a
    response lacks them; a proxy must not, so those are taken out again when they were added.
    """

    async def _prepare_headers(self) -> None:
        added = [name for name in _FILLED_IN if name not in self.headers]
        await super()._prepare_headers()
        for name in added:
            self.headers.popall(name, None)


class VerbatimStreamResponse(web.StreamResponse):
    """The streaming twin of ``VerbatimResponse``."""

    async def _prepare_headers(self) -> None:
        added = [name for name in _FILLED_IN if name not in self.headers]
        await super()._prepare_headers()
        for name in added:
            self.headers.popall(name, None)
