"""Object storage for originals, chosen by the URL's scheme (``file://`` or ``s3://``).

One implementation per module behind a small registry, as ``faust/stores/__init__.py``
does: a scheme names the module and class, imported only when used, so a ``file://``
deployment never imports botocore.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlparse

from pipeline.settings import Settings
from pipeline.storage.base import Body, ObjectStorage, StoredObject

__all__ = ["Body", "ObjectStorage", "StoredObject", "STORAGES", "open_storage", "storage_for_url"]

STORAGES = {"file": "pipeline.storage.file:FileStorage", "s3": "pipeline.storage.s3:S3Storage"}


def storage_for_url(url: str, endpoint_url: str = "", region: str = "us-east-1") -> ObjectStorage:
    """The storage a ``file://PATH`` or ``s3://BUCKET[/PREFIX]`` URL names."""
    scheme = urlparse(url).scheme
    target = STORAGES.get(scheme)
    if target is None:
        raise ValueError(f"unsupported storage URL {url!r}: use file://PATH or s3://BUCKET[/PREFIX]")
    module, _, name = target.partition(":")
    storage_class = getattr(importlib.import_module(module), name)
    return storage_class.from_url(url, endpoint_url=endpoint_url, region=region)


def open_storage(settings: Settings) -> ObjectStorage:
    """The configured storage."""
    return storage_for_url(settings.objects_url, settings.s3_endpoint_url, settings.s3_region)
