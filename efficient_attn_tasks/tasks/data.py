"""Where data lives: the data-dir override, the cache dir, checksummed downloads, safe readers.

Data dir: config ``data_dir``, else env ``EFFICIENT_ATTN_DATA``, else ``<cache dir>/data``.
Cache dir (tokenizers, generated data): config ``cache_dir``, else env ``EFFICIENT_ATTN_CACHE``,
else ``$XDG_CACHE_HOME/efficient_attn`` (``~/.cache/efficient_attn``).
A file already in the data dir is used as is (after its checksum); a missing one is downloaded
from its canonical URL into the data dir and verified before it is moved into place.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path


class DataError(RuntimeError):
    """Missing, corrupt or inconsistent data; the message says what to do."""


@dataclass(frozen=True)
class Resource:
    """One downloadable file: where it lives under the data dir, where it comes from, its SHA-256."""

    path: str  # relative to the data dir, e.g. "multi30k/train.de.gz"
    url: str
    sha256: str | None  # None: not known in advance; the first download's digest is printed


_MULTI30K = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}"
MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
}
RESOURCES: dict[str, Resource] = {
    **{
        f"multi30k/{name}": Resource(f"multi30k/{name}", _MULTI30K.format(name=name), digest)
        for name, digest in MULTI30K_SHA256.items()
    },
    "tinyshakespeare/input.txt": Resource(
        "tinyshakespeare/input.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "enwik8/enwik8.zip": Resource("enwik8/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip", None),
}
DOWNLOAD_TIMEOUT_S = 30


def data_dir(configured: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> Path:
    """``configured`` (config ``data_dir``), else ``$EFFICIENT_ATTN_DATA``, else ``<cache dir>/data`` (see
    :func:`cache_dir`; ``cache`` is config ``cache_dir``)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("EFFICIENT_ATTN_DATA"):
        return Path(os.environ["EFFICIENT_ATTN_DATA"]).expanduser()
    return cache_dir(cache) / "data"


def cache_dir(configured: str | os.PathLike | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("EFFICIENT_ATTN_CACHE"):
        return Path(os.environ["EFFICIENT_ATTN_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "efficient_attn"


def fetch(key: str, root: Path) -> Path:
    """Path of resource ``key`` under ``root``, downloading (and verifying) it if it is missing."""
    res = RESOURCES[key]
    target = root / res.path
    if not target.exists():
        _download(res, target)
    if res.sha256 is not None and sha256(target) != res.sha256:
        raise DataError(
            f"{target} does not match its SHA-256 {res.sha256} (corrupt or a different version); "
            "delete it to download it again"
        )
    return target


def fetch_all(keys: list[str], root: Path) -> dict[str, Path]:
    """Paths of resources ``keys`` under ``root``, downloading the missing ones; if any cannot be had,
    one DataError lists every missing file (after the first failed download the rest are not tried)."""
    missing = [k for k in keys if not (root / RESOURCES[k].path).exists()]
    failure = None
    for key in missing:
        try:
            fetch(key, root)
        except DataError as err:
            failure = err
            break
    still = [k for k in missing if not (root / RESOURCES[k].path).exists()]
    if still:
        names = ", ".join(RESOURCES[k].path for k in still)
        raise DataError(
            f"{len(still)} of {len(keys)} data files are not in the data dir {root} and could not be downloaded: "
            f"{names} (first failure: {getattr(failure, 'cause', failure)}). Put the files there, or point "
            "data_dir= / EFFICIENT_ATTN_DATA at a directory that has them"
        )
    return {k: fetch(k, root) for k in keys}


def _download(res: Resource, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            with urllib.request.urlopen(res.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, tmp)
    except OSError as err:  # no network, DNS failure, HTTP error, read-only data dir
        if "tmp" in locals():
            Path(tmp.name).unlink(missing_ok=True)
        error = DataError(
            f"{res.path} is not in the data dir {target.parent.parent} and downloading {res.url} failed "
            f"({err}); put the file there, or point data_dir= / EFFICIENT_ATTN_DATA at a directory that has it"
        )
        error.cause = f"downloading {res.url} failed ({err})"  # what fetch_all quotes beside its own advice
        raise error from None
    digest = sha256(Path(tmp.name))
    if res.sha256 is not None and digest != res.sha256:
        Path(tmp.name).unlink()
        raise DataError(f"download of {res.url} has SHA-256 {digest}, expected {res.sha256}")
    if res.sha256 is None:
        print(f"downloaded {res.url}: SHA-256 {digest}")
    os.replace(tmp.name, target)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, gzip-compressed if its name ends in .gz, newline stripped."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read().splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err} (corrupt or truncated file?); "
                        "delete it to download it again") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from None
