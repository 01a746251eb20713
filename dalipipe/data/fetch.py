"""Download one file over HTTP(S): resumable, verified, and never left looking finished.

    dalipipe fetch URL --out PATH [--md5 HEX | --sha256 HEX] [--record FILE] [--retries N]
    dalipipe fetch FOLDER_URL --files NAME... --out DIR --record FILE     (a model's files)

The body streams into ``PATH.part``; a ``.part`` left by an interrupted download is resumed
with an HTTP ``Range`` request (a server that ignores the range and sends the whole file again
is read from the start). The file is renamed to ``PATH`` only when it is complete (the
``Content-Length`` was reached) and its checksum matches:

- a pinned checksum (``--md5`` or ``--sha256``), where the publisher gives one (Zenodo gives
  the md5 of every file);
- otherwise the ``--record`` file (JSON, one entry per URL): the first download of a URL records
  its SHA-256 and size there, and every later download of that URL must match them, so a file
  that changes on the server, or a corrupted transfer, is noticed. Nothing is ever assumed.

A 404 (or any HTTP error), a truncated body or a mismatching checksum ends in a ``FetchError``
naming the file, the URL and what to do. A truncated ``.part`` stays, to be resumed by the next
run; a mismatching one is removed. When ``PATH`` exists already, nothing is fetched.

With ``--files`` the URL is a folder (a Hugging Face repository's ``resolve/<revision>/``) and
each named file is fetched as above into ``DIR.part/``; ``DIR`` appears only when all are there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from dalipipe.common import setup_logging, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "dalipipe-fetch/1 (python urllib)"


class FetchError(RuntimeError):
    """A download that did not give the file: the message says which, from where, and why."""


def part_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".part")


def _hashers() -> dict:
    return {"md5": hashlib.md5(), "sha256": hashlib.sha256()}


def _hash_file(path: Path, hashers: dict) -> int:
    """Feed an existing partial file to the hashers; returns its size."""
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashers.values():
                h.update(block)
            size += len(block)
    return size


# ----------------------------------------------------------------------------- the record


@contextlib.contextmanager
def _locked_record(record: Path):
    """The record's entries, read and written under an exclusive lock (parallel local jobs)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record.with_name(record.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = json.loads(record.read_text(encoding="utf-8")) if record.exists() else {}
        before = json.dumps(entries, sort_keys=True)
        yield entries
        if json.dumps(entries, sort_keys=True) != before:
            write_json(record, entries)


# ----------------------------------------------------------------------------- HTTP


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _content_range_total(value: str | None) -> int | None:
    match = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(match.group(1)) if match else None


def _what_to_do(out: Path, url: str) -> str:
    return (
        f"check the URL (config `fetch`), or download {url} yourself and place it at {out} "
        "(a file that exists is used as it is)"
    )


def _download(url: str, out: Path, timeout: float, progress: bool) -> dict:
    """Stream ``url`` into ``out.part`` (resuming it); returns {md5, sha256, size}."""
    part = part_path(out)
    hashers = _hashers()
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the part may hold the whole file already
            total = _content_range_total(err.headers.get("Content-Range"))
            if total == offset:
                log.info("%s: the partial file is complete (%d bytes)", part, offset)
                return {"size": _hash_file(part, hashers), **_digests(hashers)}
            log.warning("%s: the server refused to resume at byte %d; starting over", part, offset)
            part.unlink()
            return _download(url, out, timeout, progress)
        raise FetchError(
            f"fetch {out}: {url} answered HTTP {err.code} {err.reason}; nothing was written: "
            f"{_what_to_do(out, url)}"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(
            f"fetch {out}: cannot reach {url} ({reason}); this needs internet: run it where "
            f"there is some (docs/cluster.md), or {_what_to_do(out, url)}"
        ) from None
    with response:
        status = getattr(response, "status", 200)
        start = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range") or "")
        if offset and status == 206 and start and int(start.group(1)) == offset:
            log.info("%s: resuming at byte %d", part, offset)
            _hash_file(part, hashers)
            mode = "ab"
        else:
            if offset:
                log.warning("%s: the server ignored the range request; starting over", url)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        received = offset
        part.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=expected,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=out.name,
            disable=not progress,
            mininterval=5,
        )
        error = None
        with open(part, mode) as f, bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, OSError) as err:
                    error = err
                    break
                if not block:
                    break
                f.write(block)
                for h in hashers.values():
                    h.update(block)
                received += len(block)
                bar.update(len(block))
    if error is not None or (expected is not None and received < expected):
        got = f"{received} of {expected}" if expected is not None else f"{received}"
        why = f" ({error})" if error is not None else ""
        raise FetchError(
            f"fetch {out}: the download from {url} stopped at {got} bytes{why}. The partial "
            f"file {part} is kept: run the same command again to resume it"
        )
    if expected is not None and received > expected:
        part.unlink()
        raise FetchError(
            f"fetch {out}: {url} sent {received} bytes, more than the {expected} it announced; "
            "the partial file was removed: run again"
        )
    return {"size": received, **_digests(hashers)}


def _digests(hashers: dict) -> dict:
    return {name: h.hexdigest() for name, h in hashers.items()}


# ----------------------------------------------------------------------------- the command


def fetch(
    url: str,
    out: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    record: str | os.PathLike | None = None,
    timeout: float = 60.0,
    retries: int = 0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``out`` (see the module's docstring); returns ``out``."""
    out = Path(out)
    if out.exists():
        log.info("%s exists: nothing to fetch", out)
        return out
    pinned = {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    for attempt in range(retries + 1):
        try:
            got = _download(url, out, timeout, progress)
            break
        except FetchError as err:
            # only a transfer cut short is worth another try (the .part is resumed)
            if attempt == retries or not part_path(out).exists():
                raise
            wait = min(60, 5 * 2**attempt)
            log.warning("%s; trying again in %d s", err, wait)
            time.sleep(wait)
    part = part_path(out)
    if pinned:
        for name, want in pinned.items():
            if got[name] != want:
                part.unlink()
                raise FetchError(
                    f"fetch {out}: the {name} of what {url} sent is {got[name]}, not the "
                    f"published {want}; the download was removed. Run again (a transfer "
                    "error) or check that the URL and checksum in config `fetch` belong "
                    "together (the publisher may have changed the file)"
                )
        log.info("%s: %s matches the published checksum", out, ", ".join(pinned))
    elif record:
        with _locked_record(Path(record)) as entries:
            known = entries.get(url)
            if known is None:
                entries[url] = {
                    "sha256": got["sha256"],
                    "size": got["size"],
                    "path": str(out),
                    "first_fetched": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                }
                log.info("%s: recorded sha256 %s in %s", out, got["sha256"], record)
            elif known["sha256"] != got["sha256"]:
                part.unlink()
                raise FetchError(
                    f"fetch {out}: {url} now serves other bytes (sha256 {got['sha256']}, "
                    f"{got['size']} bytes) than when {record} recorded it (sha256 "
                    f"{known['sha256']}, {known.get('size')} bytes, on "
                    f"{known.get('first_fetched')}); the download was removed. Run again (a "
                    f"transfer error), or, if the file changed on purpose, delete its entry "
                    f"from {record} to accept the new one"
                )
            else:
                log.info("%s: sha256 matches the one recorded in %s", out, record)
    else:
        log.warning("%s: no checksum to check (no --md5/--sha256 and no --record)", out)
    os.replace(part, out)
    log.info("%s: %d bytes from %s", out, got["size"], url)
    return out


def fetch_folder(base_url: str, files: list[str], out: str | os.PathLike, **kwargs) -> Path:
    """Each of ``files`` from the folder ``base_url`` into the folder ``out``, each file as
    ``fetch`` does (``kwargs``: its checksum record, timeout, retries); ``out`` is renamed into
    place when every file is there, so a folder that exists is complete."""
    out = Path(out)
    if out.exists():
        log.info("%s exists: nothing to fetch", out)
        return out
    if kwargs.get("md5") or kwargs.get("sha256"):
        raise ValueError("fetch_folder: a folder has no single checksum; use a record")
    staging = part_path(out)
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"fetch {out}: file name {name!r} leaves the folder")
        fetch(f"{base_url.rstrip('/')}/{name}", staging / name, **kwargs)
    os.replace(staging, out)
    log.info("%s: %d files from %s", out, len(files), base_url)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe fetch", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--out", required=True, help="where the file goes")
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument("--md5", help="the publisher's md5 of the file")
    pin.add_argument("--sha256", help="the publisher's SHA-256 of the file")
    parser.add_argument(
        "--record", help="JSON file of checksums recorded at first download, checked after"
    )
    parser.add_argument("--retries", type=int, default=2, help="resumed tries after a cut")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout (s)")
    parser.add_argument("--files", nargs="+", help="URL is a folder: fetch these files of it")
    args = parser.parse_args(argv)
    if args.files and (args.md5 or args.sha256):
        parser.error("--files: a folder has no single checksum; give --record")
    setup_logging()
    try:
        if args.files:
            fetch_folder(
                args.url,
                args.files,
                args.out,
                record=args.record,
                timeout=args.timeout,
                retries=args.retries,
            )
            return 0
        fetch(
            args.url,
            args.out,
            md5=args.md5,
            sha256=args.sha256,
            record=args.record,
            timeout=args.timeout,
            retries=args.retries,
        )
    except FetchError as err:
        log.error("%s", err)
        return 1
    return 0
