"""The byte limit holds while a body streams in: the app stops reading at the limit."""

import pytest

from tests.support import images
from tests.support.asgi import CHUNK, call_with_endless_body
from tests.support.service import UPLOAD_LIMIT

pytestmark = pytest.mark.anyio


async def call(app, path: str, headers: list[tuple[bytes, bytes]], chunks: int, start: bytes = b""):
    status, pulled, _ = await call_with_endless_body(app, path, headers, chunks, start)
    return status, pulled


def part(field: str) -> bytes:
    return f'--b\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n\r\n'.encode()


@pytest.mark.parametrize(("path", "content_type", "start"), [
    ("/predict", b"image/png", b""),
    ("/predict", b"multipart/form-data; boundary=b", part("file")),
    ("/predict/batch", b"multipart/form-data; boundary=b", part("files")),
    ("/v2/models/resnet18/infer", b"application/json", b""),  # tiny_checkpoint: a resnet18
])
async def test_an_oversized_body_without_length_is_cut_off_at_the_limit(service, path, content_type, start):
    status, pulled = await call(service.app, path, [(b"content-type", content_type)], chunks=1000, start=start)
    assert status == 413
    assert pulled <= UPLOAD_LIMIT + CHUNK, f"read {pulled} bytes of a {1000 * CHUNK}-byte body"


async def test_a_declared_length_over_the_limit_is_refused_before_reading(service):
    headers = [(b"content-type", b"image/png"), (b"content-length", str(UPLOAD_LIMIT + 1).encode())]
    status, pulled = await call(service.app, "/predict", headers, chunks=1000)
    assert status == 413 and pulled == 0


async def test_a_body_at_the_limit_is_read_whole(client):
    data = images.png()
    padded = data + b"\0" * (UPLOAD_LIMIT - len(data))  # trailing bytes after IEND are ignored by decoders
    response = await client.post("/predict", content=padded, headers={"content-type": "image/png"})
    assert response.status_code == 200


async def test_a_body_in_another_field_is_refused_before_it_is_read(service):
    headers = [(b"content-type", b"multipart/form-data; boundary=b")]
    status, pulled = await call(service.app, "/predict", headers, chunks=1000, start=part("some-other-field"))
    assert status == 400 and pulled == CHUNK


async def test_a_multipart_boundary_over_256_bytes_is_a_bad_request(client):
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + images.png() + f"\r\n--{boundary}--\r\n".encode()
    response = await client.post("/predict", content=body,
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 400, response.text
    assert "boundary" in response.json()["detail"]
