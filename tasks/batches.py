"""Where new data lands: a watched local folder or S3 prefix, read with boto3.

Layout under the watch root (the same for a folder and for ``s3://bucket/prefix``)::

    <root>/<batch>/t2i/t2i.jsonl, t2i/images/*.png, ...   a batch in the world's formats
    <root>/<batch>/_READY                                 written last: the batch is complete
    <root>/_accepted/<batch>/...                          ingested batches, kept as they came
    <root>/_rejected/<batch>/... + REJECTED.txt           malformed batches and the reason

A batch is only read once its ``_READY`` marker exists, so a half-uploaded batch is never
taken. Moving is copy-then-delete: a batch is never lost, even if a move is interrupted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path, PurePosixPath

READY = "_READY"
ACCEPTED, REJECTED = "_accepted", "_rejected"
REASON = "REJECTED.txt"


class BatchSourceError(RuntimeError):
    pass


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BatchSourceError(f"refusing object {rel!r}: paths must stay inside the batch")
    return p.as_posix()


class LocalSource:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def uri(self, name: str, area: str | None = None) -> str:
        return str(self.root / area / name if area else self.root / name)

    def pending(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and p.name[0] not in "._" and (p / READY).exists())

    def fetch(self, name: str, dest: Path) -> Path:
        shutil.copytree(self.root / name, dest, ignore=shutil.ignore_patterns(READY))
        return dest

    def _move(self, name: str, area: str) -> Path:
        target = self.root / area / name
        if target.exists():  # a batch of the same name was handled before: keep both
            target = target.with_name(f"{name}-{time.strftime('%Y%m%dT%H%M%S')}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.root / name), str(target))
        return target

    def accept(self, name: str) -> str:
        return str(self._move(name, ACCEPTED))

    def reject(self, name: str, reason: str) -> str:
        target = self._move(name, REJECTED)
        (target / REASON).write_text(reason.rstrip() + "\n")
        return str(target)


class S3Source:
    def __init__(self, uri: str):
        from tasks import s3

        self.bucket, self.prefix = s3.split(uri)
        self.s3 = s3.client()

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def uri(self, name: str, area: str | None = None) -> str:
        return f"s3://{self.bucket}/{self._key(*(filter(None, [area, name])))}/"

    def _keys(self, under: str) -> list[str]:
        keys: list[str] = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=under.rstrip("/") + "/")
        for page in pages:
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    def pending(self) -> list[str]:
        base = self._key() + "/" if self.prefix else ""
        names = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for o in page.get("Contents", []):
                rel = o["Key"][len(base):].split("/")
                if len(rel) == 2 and rel[1] == READY and rel[0][:1] not in ("", ".", "_"):
                    names.add(rel[0])
        return sorted(names)

    def fetch(self, name: str, dest: Path) -> Path:
        base = self._key(name) + "/"
        dest.mkdir(parents=True, exist_ok=True)
        for key in self._keys(base):
            rel = _safe_rel(key[len(base):])
            if rel == READY:
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.bucket, key, str(dest / rel))
        return dest

    def _move(self, name: str, area: str) -> str:
        src = self._key(name) + "/"
        keys = self._keys(src)
        target = self._key(area, name)
        if self._keys(target):
            target = self._key(area, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}")
        for key in keys:  # copy everything first, then delete: an interruption loses nothing
            self.s3.copy_object(Bucket=self.bucket, Key=f"{target}/{key[len(src):]}",
                                CopySource={"Bucket": self.bucket, "Key": key})
        for key in keys:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        return target

    def accept(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._move(name, ACCEPTED)}/"

    def reject(self, name: str, reason: str) -> str:
        target = self._move(name, REJECTED)
        self.s3.put_object(Bucket=self.bucket, Key=f"{target}/{REASON}", Body=(reason.rstrip() + "\n").encode())
        return f"s3://{self.bucket}/{target}/"


def open_source(watch: str) -> LocalSource | S3Source:
    return S3Source(watch) if watch.startswith("s3://") else LocalSource(watch)
