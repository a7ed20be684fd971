"""One store URI (local directory, ``file://`` or ``s3://``) as filesystems with atomic writes.

Everything the platform persists goes through a ``Store``: it hands out an fsspec filesystem
(for byte-level work) and a pyarrow filesystem (for Parquet) configured from the same
settings, and offers the two primitives every commit protocol here is built on: an atomic
whole-object write and a create-if-absent write for commit markers.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from smartccs.checksums import CHUNK, sha256_stream
from smartccs.errors import StoreError, printable
from smartccs.faults import fault_point

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs as pafs

DEFAULT_STORE_URI = "./ccs-data"


class S3Options(BaseModel):
    """S3 connection settings; unset fields fall back to the standard AWS variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(default=None, description="e.g. http://127.0.0.1:9000")
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None

    def resolved(self) -> S3Options:
        """Fill unset fields from AWS_* variables (what boto3 would read), explicitly.

        pyarrow ignores some of these variables (AWS_ENDPOINT_URL_S3), so both filesystems are
        given the same resolved values rather than left to guess.
        """
        env = os.environ

        def secret(name: str) -> SecretStr | None:
            return SecretStr(env[name]) if env.get(name) else None

        return S3Options(
            endpoint_url=self.endpoint_url
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL"),
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key_id=self.access_key_id or env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=self.secret_access_key or secret("AWS_SECRET_ACCESS_KEY"),
            session_token=self.session_token or secret("AWS_SESSION_TOKEN"),
        )


S3_MAX_ATTEMPTS = 10
"""Tries per S3 call (botocore's standard retry mode: jittered exponential backoff up to 20 s
a wait), about a minute in all: an endpoint that restarts, throttles or flaps is waited out
instead of failing an upload, a claim or a batch. ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``
override it, as they do for any AWS client (docs/reliability.md)."""


def s3_retries() -> dict[str, str | int]:
    """The retry settings every S3 client of a store gets (botocore's ``retries`` config)."""
    env = os.environ
    return {
        "mode": env.get("AWS_RETRY_MODE") or "standard",
        "max_attempts": int(env.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
    }


class StoreConfig(BaseModel):
    """Where the platform keeps everything; picklable, so it travels to Ray workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = DEFAULT_STORE_URI
    s3: S3Options = S3Options()

    @field_validator("uri")
    @classmethod
    def _absolute_local_path(cls, uri: str) -> str:
        """A relative local path becomes absolute where the config is made (the driver): Ray
        workers run in directories of their own, where ``./ccs-data`` is somewhere else."""
        if urlparse(uri).scheme == "" and uri:
            return str(Path(uri).expanduser().resolve())
        return uri

    @classmethod
    def from_env(cls, uri: str | None = None) -> StoreConfig:
        """``uri`` if given, else ``CCS_STORE``, else the embedded default ``./ccs-data``."""
        return cls(uri=uri or os.environ.get("CCS_STORE") or DEFAULT_STORE_URI)


def open_store(config: StoreConfig | None = None, uri: str | None = None) -> Store:
    """The store a job or the service is configured with, else the one ``uri`` or the
    environment names (``StoreConfig.from_env``): every door opens its store this one way."""
    return Store(config if config is not None else StoreConfig.from_env(uri))


S3_MAX_KEY_BYTES = 1024
STAGING_OVERHEAD = len(".") + len(".tmp-") + 32
"""Bytes :func:`_staging` adds to a file name."""
LOCAL_MAX_NAME_BYTES = 255 - STAGING_OVERHEAD

_STAGING_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
"""Names :func:`_staging` gives."""


def _staging(path: str) -> str:
    """A hidden sibling of ``path`` to write before the atomic rename: Parquet, Spark and
    DuckDB readers skip dot-files, so a crash mid-write leaves nothing they would read."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class Store:
    """A store root. Keys are '/'-separated paths relative to the root."""

    def __init__(self, config: StoreConfig | str | None = None):
        if not isinstance(config, StoreConfig):
            config = StoreConfig.from_env(config)
        self.config = config
        parsed = urlparse(config.uri)
        if parsed.scheme in ("", "file"):
            path = parsed.path if parsed.scheme == "file" else config.uri
            self.protocol = "file"
            self.root = str(Path(path).expanduser().resolve())
        elif parsed.scheme in ("s3", "s3a"):
            if not parsed.netloc:
                raise StoreError(f"store URI {config.uri!r} has no bucket (s3://bucket/prefix)")
            self.protocol = "s3"
            self.root = _join(parsed.netloc, parsed.path)
            # resolve AWS_* here, on the driver: Ray workers need not share its environment
            self.config = config = config.model_copy(update={"s3": config.s3.resolved()})
        else:
            raise StoreError(
                f"store URI {config.uri!r}: unsupported scheme {parsed.scheme!r} "
                "(use a local path, file:// or s3://)"
            )

    def __repr__(self) -> str:
        return f"Store({self.uri()!r})"

    def __reduce__(self):  # filesystems are rebuilt on the other side, from the config
        return (Store, (self.config,))

    # --- addressing -------------------------------------------------------------------------
    def path(self, *key: str) -> str:
        """Filesystem path of a key, as both fsspec and pyarrow filesystems take it."""
        rel = _join(*key)
        if self.protocol == "file":
            return os.path.join(self.root, rel) if rel else self.root
        return _join(self.root, rel)

    def uri(self, *key: str) -> str:
        """Full URI of a key (``s3://bucket/...`` or ``file:///...``)."""
        scheme = "s3://" if self.protocol == "s3" else "file://"
        return scheme + self.path(*key)

    def key_of(self, uri_or_path: str) -> str:
        """Inverse of :meth:`uri`/:meth:`path`: the key of a URI inside this store.

        Parsed by hand, not with ``urlparse``: a key may hold ``?`` or ``#``, which a URL parser
        takes for a query or a fragment and cuts off.
        """
        scheme, sep, rest = uri_or_path.partition("://")
        if not sep:
            scheme, rest = "", uri_or_path
        if scheme in ("s3", "s3a"):
            path = _join(rest)
        elif scheme in ("", "file"):
            path = rest
        else:
            raise StoreError(f"{uri_or_path!r} is not inside store {self.uri()!r}")
        if self.protocol == "file":
            path = str(Path(path).resolve())
        return self._relative(path, uri_or_path)

    def _relative(self, fs_path: str, shown: str) -> str:
        root = self.root
        if fs_path != root and not fs_path.startswith(root.rstrip("/") + "/"):
            raise StoreError(f"{shown!r} is not inside store {self.uri()!r}")
        return fs_path[len(root) :].strip("/")

    def check_key(self, key: str) -> None:
        """Refuse, before any write, a key this store could not hold with its staging name.

        A local store writes ``.<name>.tmp-<32 hex>`` beside each object, so a name may use at
        most ``NAME_MAX - STAGING_OVERHEAD`` bytes; S3 allows 1024 bytes in a whole key.
        """
        if self.protocol == "s3":
            size = len(self.path(key).partition("/")[2].encode())
            if size > S3_MAX_KEY_BYTES:
                raise StoreError(
                    f"{printable(key)}: the key is {size} bytes, S3 allows {S3_MAX_KEY_BYTES}"
                )
            return
        for part in key.split("/"):
            size = len(part.encode())
            if size > LOCAL_MAX_NAME_BYTES:
                raise StoreError(
                    f"{printable(key)}: the name {printable(part[:40])}... is {size} bytes; a "
                    f"local store allows {LOCAL_MAX_NAME_BYTES} (its file system's 255 less the "
                    f"staging suffix)"
                )

    # --- filesystems ------------------------------------------------------------------------
    @functools.cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.protocol == "file":
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem(auto_mkdir=True)
        import s3fs

        o = self.config.s3.resolved()
        client_kwargs = {"region_name": o.region} if o.region else {}
        return s3fs.S3FileSystem(
            key=o.access_key_id,
            secret=o.secret_access_key.get_secret_value() if o.secret_access_key else None,
            token=o.session_token.get_secret_value() if o.session_token else None,
            endpoint_url=o.endpoint_url,
            client_kwargs=client_kwargs,
            config_kwargs={"retries": s3_retries()},
            skip_instance_cache=True,
        )

    @functools.cached_property
    def arrow_fs(self) -> pafs.FileSystem:
        import pyarrow.fs as pafs

        if self.protocol == "file":
            return pafs.LocalFileSystem()
        o = self.config.s3.resolved()
        kwargs: dict = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(s3_retries()["max_attempts"])
        }
        if o.endpoint_url:
            ep = urlparse(o.endpoint_url)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        if o.region:
            kwargs["region"] = o.region
        if o.access_key_id:
            kwargs["access_key"] = o.access_key_id
            kwargs["secret_key"] = (
                o.secret_access_key.get_secret_value() if o.secret_access_key else None
            )
            if o.session_token:
                kwargs["session_token"] = o.session_token.get_secret_value()
        return pafs.S3FileSystem(**kwargs)

    @functools.cached_property
    def _s3_client(self):
        import boto3
        from botocore.config import Config

        o = self.config.s3.resolved()
        return boto3.client(
            "s3",
            config=Config(retries=s3_retries()),
            endpoint_url=o.endpoint_url,
            region_name=o.region,
            aws_access_key_id=o.access_key_id,
            aws_secret_access_key=o.secret_access_key.get_secret_value()
            if o.secret_access_key
            else None,
            aws_session_token=o.session_token.get_secret_value() if o.session_token else None,
        )

    # --- reads ------------------------------------------------------------------------------
    def exists(self, *key: str) -> bool:
        path = self.path(*key)
        self._fresh(path.rsplit("/", 1)[0])  # s3fs answers from a cached parent listing
        return self.fs.exists(path)

    def read_bytes(self, *key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(*key))
        except FileNotFoundError:
            raise StoreError(f"{self.uri(*key)} does not exist") from None

    def read_bytes_or_none(self, *key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist (for leases and markers)."""
        self._fresh(self.path(*key))
        try:
            return self.read_bytes(*key)
        except StoreError:
            return None

    def sha256(self, key: str) -> str:
        """sha256 of an object's content: S3's own full-object SHA-256 checksum where the
        uploader had S3 compute one (no read), else hashed from a streamed read."""
        if self.protocol == "s3":
            bucket, _, obj = self.path(key).partition("/")
            try:
                head = self._s3_client.head_object(Bucket=bucket, Key=obj, ChecksumMode="ENABLED")
            except self._s3_client.exceptions.ClientError as exc:
                raise StoreError(f"{self.uri(key)}: {exc}") from None
            value = head.get("ChecksumSHA256") or ""
            if (
                value
                and "-" not in value
                and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
            ):
                return base64.b64decode(value).hex()
        try:
            with self.open_input(key) as f:
                return sha256_stream(f)
        except FileNotFoundError:
            raise StoreError(f"{self.uri(key)} does not exist") from None

    def list(self, *prefix: str) -> list[str]:
        """Keys of every object under ``prefix`` (recursive), relative to the store root."""
        base = self._fresh(self.path(*prefix))
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(self._relative(p, p) for p in found)

    def _fresh(self, path: str) -> str:
        """Drop s3fs's cached listing of ``path``: other processes write to the store (a
        service, a job), and a long-lived process must not list what it saw an hour ago."""
        if self.protocol == "s3":
            self.fs.invalidate_cache(path)
        return path

    def list_dirs(self, *prefix: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix``."""
        base = self._fresh(self.path(*prefix))
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        )

    def get_file(self, key: str, local_path: str | Path) -> None:
        self.fs.get_file(self.path(key), str(local_path))

    def open_input(self, *key: str):
        """A seekable binary file object for reading (ranged reads on S3)."""
        return self.fs.open(self.path(*key), "rb")

    # --- writes -----------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object so that readers see the old content or the new, never a part."""
        path = self.path(key)
        if self.protocol == "s3":
            fault_point("store.write", key)
            self.fs.pipe_file(path, data)  # a single PUT is atomic on S3
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _staging(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            fault_point("store.write", key)  # dies with the staging file written, not renamed
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, local_path: str | Path, key: str) -> str:
        """Copy a local file to ``key`` atomically; the sha256 of the bytes that were sent.

        The hash is taken from the very chunks written, so a caller comparing it with the
        checksum it validated knows the object holds those bytes, even if the file changed
        since. Locally a staging file is renamed into place; on S3 a multipart upload completes
        all-or-nothing and is aborted on any error.
        """
        path = self.path(key)
        digest = hashlib.sha256()
        if self.protocol == "s3":
            with open(local_path, "rb") as src:
                dst = self.fs.open(path, "wb")
                try:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                except BaseException:
                    dst.discard()  # abort: no object, not even a truncated one
                    raise
                dst.close()
            self.fs.invalidate_cache(path)
            return digest.hexdigest()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _staging(path)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return digest.hexdigest()

    def remove_staging(self, *prefix: str) -> list[str]:
        """Delete the staging files that writers killed mid-write left under ``prefix``; the
        keys removed.

        Only for a prefix that one writer at a time writes (a batch's result partitions): a
        live writer's staging file would go too. An S3 PUT stages nothing, so there it is a
        no-op.
        """
        if self.protocol != "file":
            return []
        stale = [k for k in self.list(*prefix) if _STAGING_RE.match(k.rsplit("/", 1)[-1])]
        for key in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(key))
        return stale

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` unless it exists; True if this call created it.

        The commit marker of a batch, table partition or model version is written this way, so
        two writers racing for the same commit cannot both win. Callers write bodies unique to
        the writer (a token, a time, a worker name): on S3 a PUT whose answer was lost is
        retried and meets its own object, and only its bytes tell it that it won.
        """
        path = self.path(key)
        if self.protocol == "s3":
            bucket, _, obj = path.partition("/")
            try:
                self._s3_client.put_object(Bucket=bucket, Key=obj, Body=data, IfNoneMatch="*")
            except self._s3_client.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                    self.fs.invalidate_cache(path)
                    try:  # our own retried PUT, or another writer's object?
                        return self.read_bytes(key) == data
                    except StoreError:  # created and removed since: not ours either way
                        return False
                raise
            self.fs.invalidate_cache(path)
            return True
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _staging(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if the target exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def delete(self, *prefix: str) -> None:
        """Remove an object or everything under a prefix; missing is fine."""
        path = self.path(*prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
