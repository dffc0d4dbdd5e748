"""Reading uploads with a hard byte limit that holds while the body streams in.

The declared Content-Length is checked before anything is read; then every chunk is counted as it arrives
(a chunked upload declares no length), so an oversized body is refused after at most ``limit`` bytes plus
one chunk, never read whole into memory. Multipart bodies are parsed incrementally with python-multipart,
keeping only the parts of the wanted field (file parts are kept in memory: they are bounded by the limit,
and nothing is spooled to disk). Any other field is refused as soon as its headers arrive, and one file too
many as soon as it begins, so parsing costs the event loop no more than the files asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.api.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.classification.images import header_pixels
from app.engine.errors import ImageTooLarge

if TYPE_CHECKING:  # python-multipart declares its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks

ACCEPTED = "multipart/form-data with the image in field '{field}', or the raw image bytes with Content-Type image/*"


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in _limited_stream(request, limit):
        body += chunk
    return bytes(body)


async def read_images(request: Request, *, field: str, max_files: int, limit: int, allow_raw: bool,
                      too_many: Callable[[int], Exception]) -> list[Upload]:
    """The uploaded images: the ``field`` parts of a multipart body, or (``allow_raw``) an image/* body.

    ``too_many(max_files)`` is raised as soon as the part after the ``max_files``-th one begins."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    accepted = ACCEPTED.format(field=field) if allow_raw else f"multipart/form-data with the images in field '{field}'"
    if media_type == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadRequest("the multipart Content-Type has no boundary; let your HTTP client build the "
                             "multipart body (curl -F 'file=@cat.jpg')")
        uploads = await _read_multipart(request, boundary, field, max_files, limit, too_many)
        if not uploads:
            raise BadRequest(f"no file in field '{field}': send {accepted}")
        return uploads
    if allow_raw and media_type.startswith(b"image/"):
        return [Upload(None, await read_body(request, limit))]
    if not media_type:
        raise BadRequest(f"no image in the request (it has no Content-Type): send {accepted}")
    raise UnsupportedMediaType(f"Content-Type {media_type.decode('latin-1')} is not accepted here: send {accepted}")


async def check_pixel_budget(uploads: list[Upload], budget: int) -> None:
    """Refuse a request whose images have more than ``budget`` pixels together, from their headers, before
    any is decoded (each one's own limit is decode_image's). The headers are read off the event loop."""
    total = sum(await asyncio.to_thread(lambda: [header_pixels(upload.data) for upload in uploads]))
    if total > budget:
        raise ImageTooLarge(f"the {len(uploads)} images of this request have {total} pixels together, over "
                            f"the limit of {budget} (APP_MAX_REQUEST_PIXELS); downscale them or send fewer per "
                            "request: the model sees 32x32 pixels anyway")


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is over {limit} bytes (APP_MAX_UPLOAD_BYTES); send smaller images: "
                           "the model sees 32x32 pixels, so a small JPEG or PNG loses nothing")


async def _read_multipart(request: Request, boundary: bytes, field: str, max_files: int, limit: int,
                          too_many: Callable[[int], Exception]) -> list[Upload]:
    collector = _FieldCollector(field.encode(), max_files, too_many)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except ValueError as error:  # python-multipart refuses a boundary over 256 bytes (RFC 2046 allows 70)
        raise BadRequest(f"the multipart boundary is not usable ({error}); let your HTTP client build the "
                         "multipart body") from None
    try:
        async for chunk in _limited_stream(request, limit):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise BadRequest(f"the multipart body is malformed ({error}); let your HTTP client build it") from None
    return collector.uploads


class _FieldCollector:
    """python-multipart callbacks that keep the parts named ``field`` and refuse any other part as soon as its
    headers are read, so a body holds at most ``max_files`` + 1 parts before it is refused: other parts used
    to be skipped, and 16 MiB of empty ones was 342 k parts and 3.2 s of the event loop. (python-multipart
    itself bounds each part's headers.)"""

    def __init__(self, field: bytes, max_files: int, too_many: Callable[[int], Exception]) -> None:
        self.field = field
        self.max_files = max_files
        self.too_many = too_many
        self.uploads: list[Upload] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._pieces: list[bytes | memoryview] | None = None  # of the current part, while it is kept
        self._filename: str | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._pieces, self._filename = {}, None, None

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if name != self.field:
            shown = "with no name" if name is None else f"'{name.decode('utf-8', 'replace')[:64]}'"
            raise BadRequest(f"unexpected multipart field {shown}: send the image(s) in field "
                             f"'{self.field.decode()}' and nothing else")
        if len(self.uploads) >= self.max_files:
            raise self.too_many(self.max_files)
        self._pieces = []
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        # A view of the request's own chunk, joined once when the part ends: a slice extended into a
        # bytearray, then copied out, was three copies of every byte, and most of the event loop's time
        # while 17 uploads of 15 MiB arrived at once (py-spy). What python-multipart passes from its own
        # reused buffer is copied.
        if self._pieces is not None:
            self._pieces.append(memoryview(data)[start:end] if type(data) is bytes else bytes(data[start:end]))

    def _part_end(self) -> None:
        if self._pieces is not None:
            self.uploads.append(Upload(self._filename, b"".join(self._pieces)))
            self._pieces = None
