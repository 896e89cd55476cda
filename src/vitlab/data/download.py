"""Fetch one file over HTTPS with a progress bar, check its MD5, and only then move it into place."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from vitlab.data.paths import DATA_ENV
from vitlab.errors import VitlabError
from vitlab.weights import atomic_write

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, *, md5: str, timeout: float = 60.0, hint: str | None = None) -> Path:
    """Download `url` to `dest` unless a file with the right MD5 is already there.

    The bytes go to a temporary file beside `dest` and are renamed over it only after the MD5 matches, so an
    interrupted or corrupted download never leaves a file that a later run would trust. `hint` ends the
    one-line error (what to do without a network); the default says to fetch the file by hand.
    """
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    where = hint or f"fetch it by hand and put it (or its unpacked files) in {dest.parent}, or set --data/{DATA_ENV}"

    def fetch(tmp: str) -> None:  # raising here makes atomic_write drop the temporary file
        h = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != md5:
            raise VitlabError(f"download of {url} is corrupt (MD5 {h.hexdigest()}, expected {md5}); {where}")

    try:
        atomic_write(dest, fetch)
    except (OSError, urllib.error.URLError) as e:  # no network, DNS failure, HTTP error, disk full
        reason = getattr(e, "reason", None) or e
        raise VitlabError(f"cannot download {url} ({reason}); {where}") from None
    return dest
