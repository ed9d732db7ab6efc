"""S3 access from the standard AWS configuration (any S3-compatible store).

Endpoint, region and credentials come from what boto3 resolves: ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile in
``~/.aws``), ``AWS_DEFAULT_REGION``. DVC (s3fs) and MLflow (boto3) read the same
configuration themselves; pyarrow (Ray Train's storage) does not honour the endpoint
variables, so :func:`pyarrow_fs` builds its filesystem from boto3's resolution.
Credentials are passed to clients only, never printed or recorded.
"""

from __future__ import annotations

from typing import Any


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, key.strip("/")


def client():
    import boto3

    return boto3.session.Session().client("s3")


def endpoint_url() -> str | None:
    """The custom endpoint boto3 resolved (None for AWS itself)."""
    url = client().meta.endpoint_url
    return None if url and "amazonaws.com" in url else url


def pyarrow_fs():
    """A ``pyarrow.fs.S3FileSystem`` for Ray Train's storage, configured like boto3."""
    import boto3
    from pyarrow import fs as pafs

    session = boto3.session.Session()
    kwargs: dict[str, Any] = {"region": session.region_name or "us-east-1"}
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    url = endpoint_url()
    if url:
        scheme, _, host = url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def list_keys(uri: str) -> list[tuple[str, int]]:
    """Every (key, size) under an s3:// prefix (what ``aws s3 ls --recursive`` shows)."""
    bucket, prefix = split(uri)
    out = []
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend((o["Key"], o["Size"]) for o in page.get("Contents", []))
    return out
