"""SHA-256 checks of large files, done once: a verified file's identity is remembered.

Hashing hundreds of MB on every start would cost seconds, so a successful check writes a stamp
(a small JSON file: the digest and the file's identity, i.e. device, inode, size, modification
and change times). Later checks trust the stamp while the identity is unchanged; a file that
was replaced, rewritten or even touched gets a new change time (which no one can set back
without the clock) and is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 24


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def tree_sha256(folder: Path) -> str:
    """A folder's digest: SHA-256 over each file's relative path and SHA-256, in path order."""
    digest = hashlib.sha256()
    for path in _files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def digest_of(path: Path) -> str:
    return tree_sha256(path) if path.is_dir() else sha256_file(path)


def identity(path: Path) -> list:
    """What changes when a file (or any file of a folder) is replaced or written."""
    def one(p: Path) -> list:
        s = p.stat()
        return [str(p), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]

    return [one(p) for p in _files(path)] if path.is_dir() else one(path)


def stamp(path: Path, digest: str, stamp_path: Path) -> None:
    """Remember that `path`, as it is now, has `digest` (best effort: a read-only cache just re-hashes)."""
    try:
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = stamp_path.with_name(f".{stamp_path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"sha256": digest, "identity": identity(path)}))
        os.replace(temporary, stamp_path)
    except OSError:
        pass


def stamped_digest(stamp_path: Path) -> str | None:
    """The digest a stamp records, or None without a readable stamp."""
    try:
        return str(json.loads(stamp_path.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verified(path: Path, expected: str, stamp_path: Path) -> bool:
    """Whether `path` (a file or a folder) has SHA-256 `expected`: answered by the stamp while the
    file is unchanged since it was last verified, else by hashing it (and stamping a match)."""
    try:
        record = json.loads(stamp_path.read_text())
        if record.get("sha256") == expected and record.get("identity") == json.loads(json.dumps(identity(path))):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        actual = digest_of(path)
    except OSError:
        return False
    if actual != expected:
        return False
    stamp(path, actual, stamp_path)
    return True
