"""A manifest reference that is neither a tag nor a digest, through the cache: unknown,
and the upstream is not even asked."""

from __future__ import annotations

import pytest

from tests.api.test_references import INVALID_REFERENCES
from tests.helpers import assert_error
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import FakeUpstream


@pytest.mark.parametrize("reference", INVALID_REFERENCES)
async def test_invalid_reference_through_the_cache_is_unknown(
    make_proxy: MakeProxy, upstream: FakeUpstream, reference: str
) -> None:
    proxy = await make_proxy()
    upstream.add_image("lib/app", "v1")
    resp = await proxy.get(f"/v2/fake/lib/app/manifests/{reference}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    await assert_error(await proxy.head(f"/v2/fake/lib/app/manifests/{reference}"), 404, "")
    assert upstream.total() == 0  # no such manifest can exist: nothing to ask
