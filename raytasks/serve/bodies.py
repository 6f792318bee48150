"""Reading a request's body in the ingress (``FaceAttrAPI``): the image as the body, or several as multipart
files, within the request's size limit, the replica's budget of bodies in flight and ``body_timeout_s``.

Split from raytasks/serve/ingress.py (the HTTP front); the limits' errors and the bounded stream are in
raytasks/serve/http.py.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.datastructures import Headers, UploadFile

from raytasks.serve.http import APIError, _bounded_stream, _declared_length

RAW_TYPES = ("application/octet-stream",)  # besides image/*: what `curl --data-binary` users send


class BodyReader:
    """The body-reading half of the ingress; the ingress gives it ``max_request_bytes``, ``max_files``,
    ``limits`` (``IngressSpec``) and ``_body_budget`` (``http.Budget``)."""

    async def _read_items(self, request: Request, filename: str) -> tuple[list[tuple[str, bytes]], int]:
        """The request's files, and the bytes taken from the body budget for them (give them back with
        ``self._body_budget.release``). Room for the body is taken before it is read (its Content-Length, or
        the request limit when it has none), and the whole body must arrive within ``body_timeout_s``
        (408): slow senders hold neither memory nor a connection without bound."""
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "multipart/form-data" and not (media.startswith("image/") or media in RAW_TYPES):
            raise APIError(415, "unsupported_media_type",
                           f"content type {ctype or '(none)'!r} is not an image: send the image as the body with "
                           "Content-Type image/jpeg, image/png, ... or as multipart/form-data files")
        # A declared size over the limit is answered 413 here, before waiting for room in the budget: else a
        # busy replica would answer it 503 (retry) instead of the 413 that says not to retry.
        declared = _declared_length(request, self.max_request_bytes)
        held = await self._body_budget.acquire(self.max_request_bytes if declared is None else declared,
                                               self.limits.decode_wait_s)
        try:
            if media == "multipart/form-data":
                read = self._read_multipart(request)
            else:
                read = self._read_body(request, filename)
            return await asyncio.wait_for(read, timeout=self.limits.body_timeout_s), held
        except asyncio.TimeoutError:
            await self._body_budget.release(held)
            raise APIError(408, "body_timeout", f"the request body did not arrive within "
                           f"{self.limits.body_timeout_s:g} s") from None
        except BaseException:
            await self._body_budget.release(held)
            raise

    async def _read_body(self, request: Request, filename: str) -> list[tuple[str, bytes]]:
        return [(filename, b"".join([c async for c in _bounded_stream(request, self.max_request_bytes)]))]

    async def _read_multipart(self, request: Request) -> list[tuple[str, bytes]]:
        from starlette.formparsers import MultiPartException, MultiPartParser

        parser = MultiPartParser(Headers(raw=request.headers.raw), _bounded_stream(request, self.max_request_bytes),
                                 max_files=self.max_files, max_fields=self.max_files)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise APIError(422, "bad_form", f"multipart/form-data body could not be parsed: {e}") from None
        try:
            items, fields = [], []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    items.append((value.filename or key, await value.read()))
                else:
                    fields.append(key)
        finally:
            await form.close()
        if fields:
            raise APIError(422, "bad_form", f"form fields {fields} are not files: send each image as a file part "
                           "(curl -F 'file=@face.jpg')")
        if not items:
            raise APIError(422, "bad_form", "multipart/form-data body holds no file")
        return items
