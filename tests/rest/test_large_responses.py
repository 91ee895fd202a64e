"""COMPAT §15 item 25: JSON responses are not capped at 64 KiB (0.1.x read at most 64 KiB of a body), so
large listings parse whole through the REST client."""

from __future__ import annotations

import json

import aiohttp

from contree.backend import ImageQuery
from contree.client import RemoteBackend
from tests.fake_backend import FakeBackend
from tests.rest.conftest import TOKEN


async def test_a_listing_far_beyond_64_kib_parses_whole(
    client: RemoteBackend, fake: FakeBackend, base_url: str
) -> None:
    for i in range(600):
        fake.add_image(f"large/listing-{i:04d}/{'x' * 150}:v{i}", {})
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{base_url}/v1/images",
            params={"limit": "1000", "tagged": "true"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as raw,
    ):
        body = await raw.read()
    assert raw.status == 200 and len(body) > 2 * 65536  # the server really sends a large body
    images = await client.list_images(ImageQuery(limit=1000, tagged=True))
    tags = sorted(i.tag or "" for i in images if (i.tag or "").startswith("large/"))
    assert len(tags) == 600 and tags[-1].endswith(":v599")
    assert len(json.loads(body)["images"]) == len(images)
