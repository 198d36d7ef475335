"""Datasets and stores in object storage: fsspec URLs (``s3://``, ``gs://``, ``memory://``), their filesystems, and
the first request's failures on S3 (no server at the address, no keys, no bucket) as one-line user errors naming
what to set. Imports only :mod:`meal_cache.errors` (fsspec and botocore when a URL is used)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meal_cache.errors import UserError


def is_url(path: str | Path) -> bool:
    """An fsspec URL (``memory://``, ``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(path)


def filesystem_of(url: str | Path):
    """The fsspec filesystem of a URL; a protocol whose package is missing or unknown is a user error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as err:
        raise UserError(f"'{url}' needs a package that is not installed ({err}); for s3:// install "
                        "'meal-cache[s3]'") from err  # fmt: skip
    except ValueError as err:
        raise UserError(f"'{url}': {err} (fsspec URLs such as memory://, s3://, gs://)") from err


# Where botocore (under s3fs) reads the S3 server's address and the keys from; named by the errors below.
ENDPOINT_VARIABLES = "AWS_ENDPOINT_URL (or FSSPEC_S3_ENDPOINT_URL)"
CREDENTIAL_VARIABLES = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a profile in ~/.aws/credentials)"


def _botocore_errors() -> tuple[type[Exception], tuple[type[Exception], ...]]:
    """botocore's connection and missing-credentials exception types; (never raised) placeholders where botocore
    is not installed (the s3 extra is optional)."""

    class _Never(Exception):
        pass

    try:
        from botocore.exceptions import ConnectionError, NoCredentialsError, PartialCredentialsError
    except ImportError:
        return _Never, (_Never,)
    return ConnectionError, (NoCredentialsError, PartialCredentialsError)


@contextmanager
def object_storage_errors(url: str | Path) -> Iterator[None]:
    """Turn the first request's failures on an S3 URL into user errors naming what to set: the server's address
    when nothing answers there, the keys when there are none. (s3fs passes botocore's exceptions through; they
    are met on the first request, which :func:`store_exists` makes for every command that opens a store.)"""
    connection, credentials = _botocore_errors()
    try:
        yield
    except connection as err:
        kwargs = getattr(err, "kwargs", {})
        if "proxy_url" in kwargs:  # a proxy from the environment that does not answer, not the S3 server
            raise UserError(f"cannot reach the proxy {kwargs['proxy_url']} for '{url}': set HTTPS_PROXY and "
                            "HTTP_PROXY to one that answers, or NO_PROXY to the S3 server's host") from err  # fmt: skip
        parts = urlsplit(str(kwargs.get("endpoint_url", "")))
        endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the S3 endpoint"
        raise UserError(f"nothing answers at {endpoint} for '{url}' ({type(err).__name__}): set "
                        f"{ENDPOINT_VARIABLES} to your S3 server's address (http://HOST:PORT), or unset it for AWS "
                        "itself") from err  # fmt: skip
    except credentials as err:
        raise UserError(f"no AWS credentials for '{url}' ({err}): set {CREDENTIAL_VARIABLES}") from err


def check_bucket(filesystem: Any, root: str, url: str | Path) -> None:
    """A URL into an S3 bucket that is not there (or that these keys cannot see) is a user error, rather than a
    store that is "not found" or a write that fails deep inside zarr."""
    if "s3" not in getattr(filesystem, "protocol", ()):
        return
    bucket = root.split("/", 1)[0]
    if bucket and not filesystem.exists(bucket):
        # The address botocore resolved (from either variable, or AWS's own), read from s3fs's client.
        endpoint = getattr(getattr(getattr(filesystem, "s3", None), "meta", None), "endpoint_url", None)
        raise UserError(f"S3 bucket '{bucket}' of '{url}' does not exist at {endpoint or 'the S3 endpoint'}, or "
                        f"these credentials cannot see it: create it (aws s3 mb s3://{bucket}) or name an existing "
                        f"bucket; {ENDPOINT_VARIABLES} selects the S3 server")  # fmt: skip
