"""The sha256 of a checkpoint or a VAE file (the "Model hash" and "VAE hash" of image metadata) or of a LoRA
file's tensors ("Lora hashes"), cached so that each file is read once.

The cache is a small JSON file, `model_hashes.json` in $SD_CACHE_DIR, else $XDG_CACHE_HOME/sd or
~/.cache/sd, keyed by the file's resolved path; an entry counts only while the file's size and
modification time are those it was hashed at.
"""

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import SDError

log = logging.getLogger("sd")

CHUNK_BYTES = 4 << 20  # reads of this size keep a 4 GB checkpoint out of memory without slowing the hash
CACHE_NAME = "model_hashes.json"


def cache_folder() -> Path:
    """sd's cache folder: $SD_CACHE_DIR, else $XDG_CACHE_HOME/sd or ~/.cache/sd."""
    if os.environ.get("SD_CACHE_DIR"):
        return Path(os.environ["SD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd"


def cache_file() -> Path:
    return cache_folder() / CACHE_NAME


def cached_sha256(path: str | Path, kind: str = "sha256") -> str | None:
    """The cached hash of `path` (`kind`: "sha256" of the whole file, or "tensor_sha256"), or None if it has not
    been hashed since it last changed."""
    key, size, mtime_ns = _identity(path)
    entry = _read_cache().get(key)
    if entry and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
        return entry.get(kind)
    return None


def sha256(path: str | Path) -> str:
    """The sha256 of a file as 64 hex digits, from the cache if the file has not changed since."""
    return _cached_hash(path, "sha256", start=lambda file: 0)


def tensor_sha256(path: str | Path) -> str:
    """The sha256 of a .safetensors file's data after its header (A1111's hash of LoRA files, which editing the
    metadata does not change), from the cache if the file has not changed since."""
    return _cached_hash(path, "tensor_sha256", start=lambda file: 8 + int.from_bytes(file.read(8), "little"))


def _cached_hash(path: str | Path, kind: str, start) -> str:
    cached = cached_sha256(path, kind)
    if cached:
        return cached
    key, size, mtime_ns = _identity(path)
    digest = _hash_file(Path(key), start)
    _store(key, {"size": size, "mtime_ns": mtime_ns}, kind, digest)
    return digest


def short_hash(path: str | Path) -> str:
    """The first 10 hex digits of the sha256, as AUTOMATIC1111's web UI shows a model's hash."""
    return sha256(path)[:10]


def file_fields(checkpoint: str | Path, vae: str | Path | None = None) -> dict:
    """The Settings fields that name the files of a render, as A1111 writes them: Model hash and Model, VAE hash
    and VAE (None for the checkpoint's own VAE, whatever an earlier image named)."""
    fields = {"model_hash": readable_short_hash(checkpoint, "checkpoint"), "model": Path(checkpoint).stem, "vae_hash": None, "vae": None}
    if vae is not None:
        fields.update(vae_hash=readable_short_hash(vae, "VAE file"), vae=Path(vae).name)
    return fields


def readable_short_hash(path: str | Path, what: str) -> str:
    """short_hash(), or an SDError naming `what` could not be read."""
    try:
        return short_hash(path)
    except OSError as error:
        raise SDError(f"cannot read {what} {path} ({error.strerror or error})") from None


def _identity(path: str | Path) -> tuple[str, int, int]:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def _hash_file(path: Path, start) -> str:
    """The sha256 of the file from the offset `start(file)` gives."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK_BYTES))
    with open(path, "rb", buffering=0) as file:
        file.seek(start(file))
        while size := file.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


def _read_cache() -> dict[str, dict]:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: start afresh
        return {}
    return entries if isinstance(entries, dict) else {}


def _store(key: str, identity: dict, kind: str, digest: str) -> None:
    """Adds one hash of a file, re-reading the cache first so as to keep entries that another process wrote
    meanwhile, and the file's other hash where it is of the same version of the file."""
    path = cache_file()
    entries = _read_cache()
    entry = entries.get(key, {})
    kept = entry if all(entry.get(name) == value for name, value in identity.items()) else {}
    entries[key] = {**kept, **identity, kind: digest}
    try:
        write_json_atomically(path, entries)
    except OSError as error:
        log.warning("could not cache the model hash in %s (%s): it will be computed again next time", path, error.strerror)


def write_json_atomically(path: Path, data) -> None:
    """Writes `data` as JSON through a temporary file beside `path`, so that readers see the old file or the new
    one, never half of one. Raises OSError (no folder to hold it, a full disk), leaving no temporary file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(data, indent=1))
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):  # never written, or no folder to hold it
            temporary.unlink()
        raise


def old_hash(path: str | Path) -> str:
    """AUTOMATIC1111's old short hash (AutoV1), by which its ControlNet extension names a model's file: the sha256
    of the 64 KiB at 1 MiB into the file, 8 hex digits. Reads those bytes alone, so it is not cached."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
