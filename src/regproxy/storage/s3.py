"""Blobs in an S3 bucket, through aiobotocore.

Keys, under the configured prefix:

- ``blobs/<upload_id>``: a blob. An upload streams into a multipart upload to this key, and
  completing it publishes the blob where it already is: the blob row records this key, and
  the bytes are never copied again. Nothing is visible before its row exists.
- ``uploads/<upload_id>/tail.<gen>``: the bytes of an unfinished upload that do not fill a
  part yet (parts must be at least 5 MiB, except the last), kept between requests so that
  any process sharing the bucket and the database can continue the upload.

An upload's state (recorded with its row, see ``_State``) names its multipart upload and the
parts so far (number, ETag, size), or ``base``, an object at the blob key holding the first
bytes, and the current tail. A request appends: it reads the tail lazily on its first write,
fills parts of ``part_size`` (one buffering, one in flight), and on suspend uploads what is
left as a part when it is at least 5 MiB, or as the next tail object. Tails are never
overwritten: a request that fails leaves the recorded state intact, and a superseded tail is
deleted one step later, once a state that no longer needs it has been recorded.

Takeover: S3 cannot read the parts of an unfinished multipart upload, so when a process that
does not hold an upload's running hash continues it, ``read_upload`` completes the parts so
far into the blob key (the ``base``), streams it and the tail to be hashed, and the writer
starts a new multipart upload whose first parts are server-side copies (UploadPartCopy) of
the base. That costs a copy of the prefix inside S3, once per takeover, and no extra memory.

Faults: every call goes through botocore's standard retry mode (bounded attempts, backoff);
what still fails for a reason outside regproxy (connection, timeout, throttling, 5xx, denied
access) raises ``Unavailable`` (503), and the recorded upload state stays valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from regproxy.config import ConfigError, S3Config
from regproxy.errors import BlobUploadUnknown, SizeInvalid, Unavailable
from regproxy.oci import Digest
from regproxy.storage.base import StoredObject, UploadLost
from regproxy.streams import rechunk

log = logging.getLogger(__name__)

MiB = 1 << 20
# S3's limits: parts are 5 MiB to 5 GiB (the last may be smaller), at most 10,000 of them.
MIN_PART = 5 * MiB
MAX_PART = 5 << 30
MAX_PARTS = 10_000
READ_SIZE = MiB
OCTET_STREAM = "application/octet-stream"
# Multipart uploads this process completed on a takeover, remembered so its writer need not
# find out by a failed request (bounded; the recovery path covers anything forgotten).
CONSOLIDATED_MEMORY = 1024
# Seconds close() waits for background clean-ups (deleting superseded tails).
CLEANUP_GRACE = 10.0

# Failures that say S3 cannot serve now, not that the request was wrong.
_OUTAGE_CODES = frozenset(
    {
        "AccessDenied",
        "ExpiredToken",
        "InternalError",
        "InvalidAccessKeyId",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "SignatureDoesNotMatch",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)
_UNREACHABLE = (
    HTTPClientError,
    BotoConnectionError,
    CredentialRetrievalError,
    NoCredentialsError,
    IncompleteReadError,
    ChecksumError,
    aiohttp.ClientError,
    TimeoutError,
    OSError,
)

T = TypeVar("T")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_outage(exc: ClientError) -> bool:
    status = _status(exc)
    return status >= 500 or status in (401, 403, 408, 429) or _code(exc) in _OUTAGE_CODES


def _is_missing(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (
        _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NoSuchUpload", "NotFound")
    )


def _multipart_etag(parts: list[_Object]) -> str | None:
    """The ETag S3 gives the completion of ``parts`` (None when the ETags are not MD5s)."""
    try:
        digests = b"".join(bytes.fromhex(part.etag.strip('"')) for part in parts)
    except ValueError:
        return None
    return f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'


# -- the state recorded with an upload --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Object:
    """Something stored: an object or a part, by size and ETag."""

    size: int
    etag: str


@dataclass(slots=True)
class _State:
    # Bumped by every suspend that stored something; the tail's name.
    gen: int = 0
    # The multipart upload to the blob key and its parts so far (all >= 5 MiB), in order ...
    mpu: str | None = None
    parts: list[_Object] = field(default_factory=list)
    # ... or instead, after a takeover, the object at the blob key holding the first bytes.
    base: _Object | None = None
    # ``uploads/<id>/tail.<gen>``: the bytes after those (< 5 MiB), if any.
    tail: _Object | None = None
    # The generation of a superseded tail that may still exist.
    stale: int | None = None
    # The blob key holds an object made by a takeover, which the commit will replace.
    partial: bool = False

    @property
    def stored(self) -> int:
        if self.base is not None:
            return self.base.size
        return sum(part.size for part in self.parts)

    @property
    def size(self) -> int:
        return self.stored + (self.tail.size if self.tail is not None else 0)

    def dumps(self) -> str:
        doc: dict[str, Any] = {"v": 1, "gen": self.gen}
        if self.mpu is not None:
            doc["mpu"] = self.mpu
            doc["parts"] = [[part.etag, part.size] for part in self.parts]
        for name in ("base", "tail"):
            obj = getattr(self, name)
            if obj is not None:
                doc[name] = [obj.etag, obj.size]
        if self.stale is not None:
            doc["stale"] = self.stale
        if self.partial:
            doc["partial"] = True
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> _State:
        if not text:
            return cls()
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError("not an S3 upload state")

        def obj(value: Any) -> _Object:
            etag, size = value
            return _Object(int(size), str(etag))

        return cls(
            gen=int(doc["gen"]),
            mpu=str(doc["mpu"]) if "mpu" in doc else None,
            parts=[obj(part) for part in doc.get("parts", [])],
            base=obj(doc["base"]) if "base" in doc else None,
            tail=obj(doc["tail"]) if "tail" in doc else None,
            stale=int(doc["stale"]) if "stale" in doc else None,
            partial=bool(doc.get("partial", False)),
        )


# -- the store ----------------------------------------------------------------------------------


class S3BlobStore:
    def __init__(self, client: Any, config: S3Config) -> None:
        self._client = client
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        self.part_size = config.part_size
        self._part_slots = asyncio.Semaphore(config.max_concurrency)
        self._consolidated: OrderedDict[str, _Object] = OrderedDict()
        self._cleanups: set[asyncio.Task[None]] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, config: S3Config, session: AioSession | None = None
    ) -> AsyncIterator[S3BlobStore]:
        """A store with a client of its own, open while the context lasts; checks the bucket
        first. ``session`` may share loaded AWS models and credentials between clients."""
        client_config = AioConfig(
            region_name=config.region or None,
            signature_version="s3v4",
            s3={"addressing_style": config.addressing_style},
            retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_pool_connections=config.max_connections,
            # Digests are verified end to end; and S3-compatible servers differ on checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        credentials: dict[str, str] = {}
        if config.access_key_id:
            credentials["aws_access_key_id"] = config.access_key_id
            credentials["aws_secret_access_key"] = config.secret_access_key
            if config.session_token:
                credentials["aws_session_token"] = config.session_token
        session = session or AioSession()
        async with session.create_client(
            "s3", endpoint_url=config.endpoint_url or None, config=client_config, **credentials
        ) as client:
            store = cls(client, config)
            await store.check()
            try:
                yield store
            finally:
                await store.close()

    async def check(self) -> None:
        """Stop start-up with a clear message when the bucket cannot be used."""
        where = self.config.endpoint_url or f"AWS ({self.config.region or 'default region'})"
        key = "storage.s3"
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status, code = _status(exc), _code(exc)
            if status == 404 or code == "NoSuchBucket":
                raise ConfigError(
                    f"config key {key}.bucket: there is no bucket {self.bucket!r} at {where}"
                ) from exc
            if status in (401, 403):
                raise ConfigError(
                    f"config key {key}.access_key_id: {where} refused access to bucket"
                    f" {self.bucket!r} ({status} {code}): wrong credentials, or not allowed"
                    " to use this bucket"
                ) from exc
            if status == 301:
                raise ConfigError(
                    f"config key {key}.region: bucket {self.bucket!r} is in another region"
                ) from exc
            raise ConfigError(
                f"config key {key}.bucket: {where} answered {status} {code} for bucket"
                f" {self.bucket!r}"
            ) from exc
        except (NoCredentialsError, CredentialRetrievalError) as exc:
            raise ConfigError(
                f"config key {key}.access_key_id: no S3 credentials ({exc}); set access_key_id"
                " and secret_access_key, or configure the AWS credential chain"
            ) from exc
        except _UNREACHABLE as exc:
            raise ConfigError(
                f"config key {key}.endpoint_url: cannot reach S3 at {where}: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=CLEANUP_GRACE)
        for task in list(self._cleanups):
            task.cancel()
        await asyncio.gather(*self._cleanups, return_exceptions=True)

    async def wait_cleanups(self) -> None:
        """Wait for the background clean-ups started so far (deletes of superseded tails)."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups))

    # -- keys ------------------------------------------------------------------------------

    @staticmethod
    def blob_key(upload_id: str) -> str:
        return f"blobs/{upload_id}"

    def _full(self, key: str) -> str:
        return self.prefix + key

    def _tail_key(self, upload_id: str, gen: int) -> str:
        return f"{self.prefix}uploads/{upload_id}/tail.{gen}"

    # -- the BlobStore protocol ------------------------------------------------------------

    async def open_writer(self, upload_id: str, state: str | None, offset: int) -> S3BlobWriter:
        recorded = _State() if state is None else self._parse(upload_id, state)
        if recorded.size != offset:
            raise BlobUploadUnknown(
                f"upload {upload_id} holds {recorded.size} bytes in storage, not {offset}",
                detail={"upload_id": upload_id},
            )
        return S3BlobWriter(self, upload_id, recorded)

    async def read_upload(self, upload_id: str, state: str, length: int) -> AsyncIterator[bytes]:
        recorded = self._parse(upload_id, state)
        base = recorded.base
        if recorded.mpu is not None:
            base = self._consolidated.get(recorded.mpu) or await self._consolidate(
                upload_id, recorded
            )
        if base is not None:
            count = min(length, base.size)
            key = self._full(self.blob_key(upload_id))
            async for chunk in self._read_object(key, 0, count, base.etag, upload_id):
                yield chunk
            length -= count
        if recorded.tail is not None and length > 0:
            key = self._tail_key(upload_id, recorded.gen)
            count = min(length, recorded.tail.size)
            async for chunk in self._read_object(key, 0, count, recorded.tail.etag, upload_id):
                yield chunk

    async def delete_upload(self, upload_id: str, state: str) -> None:
        try:
            recorded = _State.loads(state)
        except (ValueError, KeyError, TypeError):
            recorded = _State()
        await self._discard(upload_id, recorded, None)

    async def upload_stored(self, upload_id: str, state: str, offset: int) -> bool:
        try:
            recorded = _State.loads(state)
        except (ValueError, KeyError, TypeError):
            return False
        if recorded.size != offset:
            return False
        key = self._full(self.blob_key(upload_id))
        if recorded.mpu is not None and recorded.mpu not in self._consolidated:
            try:
                await self._call("list_parts", Key=key, UploadId=recorded.mpu, MaxParts=1)
            except ClientError as exc:
                if not _is_missing(exc):
                    raise
                # Completed: by a takeover (the parts so far, still usable), or by a commit.
                if await self._completed_as(key, recorded.parts) is None:
                    return False
        elif recorded.base is not None and await self._head(key) != recorded.base:
            return False
        if recorded.tail is not None:
            tail = await self._head(self._tail_key(upload_id, recorded.gen))
            return tail == recorded.tail
        return True

    async def published(self, upload_id: str, digest: Digest) -> tuple[str, int] | None:
        key = self.blob_key(upload_id)  # completed in place
        found = await self._head(self._full(key))
        return None if found is None else (key, found.size)

    async def read(self, key: str, start: int, length: int) -> AsyncIterator[bytes]:
        async for chunk in self._read_object(self._full(key), start, length):
            yield chunk

    def local_path(self, key: str) -> Path | None:
        return None

    async def redirect_url(self, key: str) -> str | None:
        if not self.config.redirect:
            return None
        url = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=math.ceil(self.config.redirect_expiry),
        )
        return str(url)

    async def exists(self, key: str) -> bool:
        try:
            await self._call("head_object", Key=self._full(key))
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        await self._call("delete_object", Key=self._full(key))

    async def stat(self, key: str) -> int | None:
        found = await self._head(self._full(key))
        return found.size if found is not None else None

    async def list_blobs(self) -> AsyncIterator[StoredObject]:
        async for key, size, mtime in self._list(f"{self.prefix}blobs/"):
            yield StoredObject(key, size, mtime, key.split("/", 1)[1])

    async def list_upload_objects(self) -> AsyncIterator[StoredObject]:
        async for key, size, mtime in self._list(f"{self.prefix}uploads/"):
            yield StoredObject(key, size, mtime, key.split("/")[1])
        params: dict[str, Any] = {"Prefix": f"{self.prefix}blobs/"}
        while True:
            page = await self._call("list_multipart_uploads", **params)
            for item in page.get("Uploads", []):
                key = item["Key"][len(self.prefix) :]
                mtime = item["Initiated"].timestamp()
                yield StoredObject(key, 0, mtime, key.split("/", 1)[1], item["UploadId"])
            if not page.get("IsTruncated"):
                break
            params["KeyMarker"] = page["NextKeyMarker"]
            params["UploadIdMarker"] = page["NextUploadIdMarker"]

    async def delete_upload_object(self, obj: StoredObject) -> None:
        if obj.multipart is not None:
            await self._abort_multipart(self._full(obj.key), obj.multipart)
        else:
            await self._call("delete_object", Key=self._full(obj.key))

    async def _list(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        """(key without the configured prefix, size, mtime) of each object under ``prefix``."""
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = await self._call("list_objects_v2", **params)
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) :]
                yield key, item["Size"], item["LastModified"].timestamp()
            token = page.get("NextContinuationToken")
            if not token:
                break
            params["ContinuationToken"] = token

    # -- S3 calls --------------------------------------------------------------------------

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One S3 operation on the bucket (retried by botocore); an outage is ``Unavailable``."""
        try:
            response: dict[str, Any] = await getattr(self._client, operation)(
                Bucket=self.bucket, **params
            )
        except ClientError as exc:
            if _is_outage(exc):
                log.warning("S3 %s failed: %s", operation, exc)
                raise Unavailable(f"storage unavailable ({_code(exc) or _status(exc)})") from exc
            raise
        except _UNREACHABLE as exc:
            log.warning("S3 %s failed: %r", operation, exc)
            raise Unavailable("storage unavailable (cannot reach S3)") from exc
        return response

    async def _read_object(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None = None,
        upload_id: str | None = None,
    ) -> AsyncIterator[bytes]:
        """``length`` bytes of ``key`` from ``start``, in pieces of about ``READ_SIZE``."""
        if length <= 0:
            return
        params: dict[str, Any] = {"Key": key, "Range": f"bytes={start}-{start + length - 1}"}
        if if_match is not None:
            params["IfMatch"] = if_match
        try:
            response = await self._call("get_object", **params)
        except ClientError as exc:
            if upload_id is not None and (_is_missing(exc) or _status(exc) == 412):
                raise _upload_lost(upload_id) from exc
            raise
        body = response["Body"]

        async def pieces(remaining: int) -> AsyncIterator[bytes]:
            while remaining > 0:
                try:
                    chunk = await body.read(min(READ_SIZE, remaining))
                except (*_UNREACHABLE, BotoCoreError) as exc:
                    raise Unavailable("storage unavailable (S3 read failed)") from exc
                if not chunk:
                    raise Unavailable(
                        f"storage unavailable (S3 object ended {remaining} bytes early)"
                    )
                remaining -= len(chunk)
                yield chunk

        try:
            async for chunk in rechunk(pieces(length), READ_SIZE):
                yield chunk
        finally:
            body.close()

    async def _put_object(self, key: str, data: io.BytesIO) -> _Object:
        size = _length(data)
        response = await self._call("put_object", Key=key, Body=data, ContentType=OCTET_STREAM)
        return _Object(size, str(response["ETag"]))

    async def _head(self, key: str) -> _Object | None:
        try:
            response = await self._call("head_object", Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        return _Object(int(response["ContentLength"]), str(response["ETag"]))

    async def _completed_as(self, key: str, parts: list[_Object]) -> _Object | None:
        """The object at ``key``, when it is what completing ``parts`` made of it."""
        found = await self._head(key)
        if found is None or found.size != sum(part.size for part in parts):
            return None
        expected = _multipart_etag(parts)
        if expected is not None and found.etag != expected:
            return None
        return found

    async def _consolidate(self, upload_id: str, recorded: _State) -> _Object:
        """Complete an unfinished upload's parts into its blob key, to read them (takeover)."""
        assert recorded.mpu is not None
        key = self._full(self.blob_key(upload_id))
        parts = [
            {"PartNumber": number, "ETag": part.etag}
            for number, part in enumerate(recorded.parts, 1)
        ]
        try:
            response = await self._call(
                "complete_multipart_upload",
                Key=key,
                UploadId=recorded.mpu,
                MultipartUpload={"Parts": parts},
            )
            base = _Object(recorded.stored, str(response["ETag"]))
        except (ClientError, Unavailable) as exc:
            # Completed already, by a request that failed before its state was recorded?
            found = await self._completed_as(key, recorded.parts)
            if found is None:
                if _is_missing(exc):
                    raise _upload_lost(upload_id) from exc
                raise
            base = found
        log.info("upload %s: completed %d part(s) to continue it here", upload_id, len(parts))
        self._remember(recorded.mpu, base)
        return base

    def _remember(self, mpu: str, base: _Object) -> None:
        self._consolidated[mpu] = base
        while len(self._consolidated) > CONSOLIDATED_MEMORY:
            self._consolidated.popitem(last=False)

    async def _abort_multipart(self, key: str, mpu: str) -> None:
        try:
            await self._call("abort_multipart_upload", Key=key, UploadId=mpu)
        except ClientError as exc:
            if not _is_missing(exc):
                raise

    async def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            if len(batch) == 1:
                await self._call("delete_object", Key=batch[0]["Key"])
            else:
                await self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})

    async def _discard(
        self, upload_id: str, recorded: _State, created: str | None, partial: bool = False
    ) -> None:
        """Everything an abandoned upload stored: multipart uploads, partial blob, tails."""
        key = self._full(self.blob_key(upload_id))
        partial = partial or recorded.base is not None or recorded.partial
        for mpu in {recorded.mpu, created} - {None}:
            assert mpu is not None
            partial = partial or self._consolidated.pop(mpu, None) is not None
            await self._abort_multipart(key, mpu)
        if partial:  # a takeover completed the parts so far into the blob key; no row uses it
            await self._call("delete_object", Key=key)
        prefix = f"{self.prefix}uploads/{upload_id}/"
        token: str | None = None
        while True:
            page = await self._call(
                "list_objects_v2", Prefix=prefix, **({"ContinuationToken": token} if token else {})
            )
            await self._delete_keys([item["Key"] for item in page.get("Contents", [])])
            token = page.get("NextContinuationToken")
            if not token:
                break

    def _spawn(self, what: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run a best-effort clean-up in the background (close() waits for it)."""

        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning("S3 clean-up (%s) failed, leaving garbage behind: %r", what, exc)

        task = asyncio.create_task(run())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _parse(self, upload_id: str, state: str) -> _State:
        try:
            return _State.loads(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise BlobUploadUnknown(
                f"upload {upload_id} was not started on S3 storage",
                detail={"upload_id": upload_id},
            ) from exc


def _length(data: io.BytesIO) -> int:
    """The size of a buffer to send, rewound to its start."""
    size = data.seek(0, io.SEEK_END)
    data.seek(0)
    return size


def _upload_lost(upload_id: str) -> UploadLost:
    return UploadLost(upload_id)


# -- the writer ---------------------------------------------------------------------------------


class S3BlobWriter:
    """Appends to one upload: ``part_size`` bytes buffered, at most one part in flight."""

    def __init__(self, store: S3BlobStore, upload_id: str, recorded: _State) -> None:
        self._store = store
        self._id = upload_id
        self._recorded = recorded
        self._key = store._full(store.blob_key(upload_id))
        self._mpu = recorded.mpu
        self._parts = list(recorded.parts)
        self._base = recorded.base
        # The recorded tail, until the first write reads it into the buffer.
        self._tail = recorded.tail
        # The multipart upload is the recorded one, not used yet by this writer: it may have
        # been completed by a takeover (read_upload, here or in a request that failed).
        self._adopted = recorded.mpu is not None
        # A multipart upload this writer started (aborted unless a suspend records it).
        self._created: str | None = None
        self._partial = recorded.partial or recorded.base is not None
        # The part being filled. A BytesIO, because it is sent as a stream: aiohttp would
        # copy bytes given whole (twice, into the socket transport's buffer).
        self._buffer: io.BytesIO | None = None
        self._filled = 0
        self._size = recorded.size
        self._changed = False
        self._pending: asyncio.Task[None] | None = None
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    async def write(self, chunk: bytes) -> None:
        assert not self._done, "writer is closed"
        if not chunk:
            return
        if self._tail is not None:
            await self._load_tail()
        self._size += len(chunk)
        self._changed = True
        view = memoryview(chunk)
        while view:
            view = self._fill(view)
            if self._filled == self._store.part_size:
                part = self._take()
                await self._drain()  # one part in flight at a time: the caller waits for S3
                self._pending = asyncio.create_task(self._upload_part(part))

    async def suspend(self) -> str:
        assert not self._done, "writer is closed"
        try:
            await self._drain()
            if not self._changed:
                self._done = True
                return self._recorded.dumps()
            self._apply_takeover()
            data = self._take()
            tail: _Object | None = None
            gen = self._recorded.gen + 1
            if _length(data) >= MIN_PART:
                await self._upload_part(data)
            elif _length(data):
                tail = await self._store._put_object(self._store._tail_key(self._id, gen), data)
        except BaseException:
            await self.release()
            raise
        self._done = True
        recorded = self._recorded
        if recorded.stale is not None:  # superseded by the recorded state: safe to delete
            self._store._spawn(
                "superseded tail",
                self._store._delete_keys([self._store._tail_key(self._id, recorded.stale)]),
            )
        return _State(
            gen=gen,
            mpu=self._mpu,
            parts=self._parts,
            base=self._base,
            tail=tail,
            stale=recorded.gen if recorded.tail is not None else None,
            partial=self._partial,
        ).dumps()

    async def commit(self, digest: Digest) -> str:
        assert not self._done, "writer is closed"
        store = self._store
        try:
            await self._drain()
            self._apply_takeover()
            data = self._take()
            tail_key = store._tail_key(self._id, self._recorded.gen)
            if self._mpu is None and self._base is None:
                if self._tail is not None:  # all of it in the tail, nothing written since
                    await store._call(
                        "copy_object",
                        Key=self._key,
                        CopySource={"Bucket": store.bucket, "Key": tail_key},
                        CopySourceIfMatch=self._tail.etag,
                    )
                else:
                    await store._put_object(self._key, data)
            elif self._mpu is None and self._tail is None and not _length(data):
                assert self._base is not None  # the blob key holds it all (a takeover)
                if await store._head(self._key) != self._base:
                    raise _upload_lost(self._id)
            else:
                if self._tail is not None:
                    tail = self._tail
                    await self._on_multipart(lambda mpu: self._copy_part(mpu, tail_key, tail))
                elif _length(data):
                    await self._on_multipart(lambda mpu: self._send_part(mpu, data))
                await self._on_multipart(self._complete)
        except BaseException:
            await self.release()
            raise
        self._done = True
        self._forget_recorded()
        return store.blob_key(self._id)

    async def release(self) -> None:
        if self._done:
            return
        self._done = True
        self._take()
        task, self._pending = self._pending, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._created is not None:
            self._store._spawn(
                "unrecorded multipart upload",
                self._store._abort_multipart(self._key, self._created),
            )

    async def abort(self) -> None:
        created = self._created
        self._created = None
        await self.release()
        await self._store._discard(self._id, self._recorded, created, self._partial)

    # -- internals -------------------------------------------------------------------------

    async def _drain(self) -> None:
        task, self._pending = self._pending, None
        if task is not None:
            await task

    def _fill(self, view: memoryview) -> memoryview:
        """Copy what fits of ``view`` into the part buffer; return the rest."""
        if self._buffer is None:
            self._buffer = io.BytesIO()
        count = min(len(view), self._store.part_size - self._filled)
        self._buffer.write(view[:count])
        self._filled += count
        return view[count:]

    def _take(self) -> io.BytesIO:
        """The buffered bytes; the next write starts a new buffer."""
        buffer, self._buffer = self._buffer, None
        self._filled = 0
        return buffer if buffer is not None else io.BytesIO()

    async def _load_tail(self) -> None:
        tail = self._tail
        assert tail is not None and not self._filled
        key = self._store._tail_key(self._id, self._recorded.gen)
        async for chunk in self._store._read_object(key, 0, tail.size, tail.etag, self._id):
            self._fill(memoryview(chunk))  # a tail is smaller than a part
        self._tail = None

    def _apply_takeover(self) -> None:
        """Use the base read_upload made of the recorded parts, if it just did."""
        if self._adopted and self._mpu is not None:
            base = self._store._consolidated.get(self._mpu)
            if base is not None:
                self._mpu, self._parts, self._base = None, [], base
                self._adopted = False
                self._partial = True

    async def _multipart(self) -> str:
        """The multipart upload to append parts to, started when there is none yet."""
        self._apply_takeover()
        if self._mpu is None:
            response = await self._store._call(
                "create_multipart_upload", Key=self._key, ContentType=OCTET_STREAM
            )
            self._mpu = self._created = str(response["UploadId"])
            self._adopted = False
            if self._base is not None:
                await self._copy_base(self._mpu, self._base)
        return self._mpu

    async def _on_multipart(self, operation: Callable[[str], Awaitable[T]]) -> T:
        """Run ``operation`` on the multipart upload. If it was the recorded one and is gone
        because a takeover in a failed request completed it, continue from that base."""
        mpu = await self._multipart()
        if not self._adopted:
            return await operation(mpu)
        try:
            result = await operation(mpu)
        except (ClientError, Unavailable) as exc:
            base = await self._store._completed_as(self._key, self._parts)
            if base is None:
                if _is_missing(exc):
                    raise _upload_lost(self._id) from exc
                raise
            log.info("upload %s: continuing from parts completed by a takeover", self._id)
            self._mpu, self._parts, self._base = None, [], base
            self._partial = True
            result = await operation(await self._multipart())
        self._adopted = False
        return result

    async def _upload_part(self, data: io.BytesIO) -> None:
        await self._on_multipart(lambda mpu: self._send_part(mpu, data))

    async def _send_part(self, mpu: str, data: io.BytesIO) -> None:
        number = self._next_part()
        size = _length(data)
        async with self._store._part_slots:
            response = await self._store._call(
                "upload_part", Key=self._key, UploadId=mpu, PartNumber=number, Body=data
            )
        self._parts.append(_Object(size, str(response["ETag"])))

    async def _copy_part(self, mpu: str, source: str, obj: _Object, start: int = 0) -> None:
        """Server-side: ``obj.size`` bytes of ``source`` from ``start`` become the next part."""
        number = self._next_part()
        response = await self._store._call(
            "upload_part_copy",
            Key=self._key,
            UploadId=mpu,
            PartNumber=number,
            CopySource={"Bucket": self._store.bucket, "Key": source},
            CopySourceRange=f"bytes={start}-{start + obj.size - 1}",
            CopySourceIfMatch=obj.etag,
        )
        self._parts.append(_Object(obj.size, str(response["CopyPartResult"]["ETag"])))

    async def _copy_base(self, mpu: str, base: _Object) -> None:
        """The base (>= 5 MiB: whole parts) becomes the first parts, copied inside S3."""
        count = math.ceil(base.size / MAX_PART)
        step = math.ceil(base.size / count)
        for start in range(0, base.size, step):
            piece = _Object(min(step, base.size - start), base.etag)
            await self._copy_part(mpu, self._key, piece, start)
        self._base = None

    async def _complete(self, mpu: str) -> None:
        parts = [
            {"PartNumber": number, "ETag": part.etag} for number, part in enumerate(self._parts, 1)
        ]
        await self._store._call(
            "complete_multipart_upload",
            Key=self._key,
            UploadId=mpu,
            MultipartUpload={"Parts": parts},
        )

    def _next_part(self) -> int:
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise SizeInvalid(
                f"a blob may have at most {MAX_PARTS} parts of {self._store.part_size} bytes"
                " (storage.s3.part_size)"
            )
        return number

    def _forget_recorded(self) -> None:
        """After a commit: drop the tails the recorded state kept (in the background)."""
        recorded = self._recorded
        gens = [gen for gen in (recorded.stale,) if gen is not None]
        if recorded.tail is not None:
            gens.append(recorded.gen)
        if recorded.mpu is not None:
            self._store._consolidated.pop(recorded.mpu, None)
        if gens:
            keys = [self._store._tail_key(self._id, gen) for gen in gens]
            self._store._spawn("committed upload's tails", self._store._delete_keys(keys))
