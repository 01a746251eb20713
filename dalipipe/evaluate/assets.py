"""Fetch the Stanford CoreNLP 3.6.0 jars that SPICE (and so SPIDEr) needs.

    dalipipe fetch-metric-assets [--dest DIR] [--url URL]

Needs internet (run it once on a login node). The two jars go into pycocoevalcap's
``spice/lib`` folder, where its SPICE jar looks for them on its class path; with ``--dest`` they
go elsewhere and are linked into that folder. Without them, ``dalipipe score`` reports SPICE and
SPIDEr as "not computed" with the reason.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from dalipipe.common import atomic_path, setup_logging

log = logging.getLogger(__name__)

CORENLP_RELEASE = "stanford-corenlp-full-2015-12-09"
CORENLP_URL = f"http://nlp.stanford.edu/software/{CORENLP_RELEASE}.zip"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_lib_dir() -> Path:
    """The folder pycocoevalcap's spice-1.0.jar searches for its dependencies."""
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__file__).resolve().parent / "lib"


def missing_jars(lib_dir: Path | None = None) -> list[Path]:
    lib_dir = spice_lib_dir() if lib_dir is None else Path(lib_dir)
    return [lib_dir / name for name in CORENLP_JARS if not (lib_dir / name).is_file()]


def spice_missing_reason(lib_dir: Path | None = None) -> str | None:
    """None when SPICE can run; else why not, in words a user can act on."""
    if shutil.which("java") is None:
        return "java not found on PATH (SPICE needs Java 8+)"
    missing = missing_jars(lib_dir)
    if missing:
        return (
            "Stanford CoreNLP 3.6.0 missing "
            f"({', '.join(str(p) for p in missing)}; run `dalipipe fetch-metric-assets`)"
        )
    return None


def members_in_archive(release: str = CORENLP_RELEASE) -> dict[str, str]:
    """Path of each jar inside the release zip -> its file name."""
    return {f"{release}/{name}": name for name in CORENLP_JARS}


def extract_jars(archive: Path, dest: Path) -> list[Path]:
    """Copy the two jars out of the CoreNLP release zip into ``dest``."""
    written = []
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member, name in members_in_archive().items():
                if member not in names:
                    raise FileNotFoundError(f"{archive}: has no {member}")
                with (
                    zf.open(member) as src,
                    atomic_path(dest / name) as tmp,
                    open(tmp, "wb") as out,
                ):
                    shutil.copyfileobj(src, out)
                written.append(dest / name)
    except zipfile.BadZipFile:
        raise ValueError(f"{archive}: not a zip archive (an interrupted download?)") from None
    return written


def fetch(url: str = CORENLP_URL, dest: Path | None = None, timeout: float = 60.0) -> list[Path]:
    """Download the release, keep the two jars; link them into pycocoevalcap when ``dest`` is elsewhere."""
    lib_dir = spice_lib_dir()
    dest = lib_dir if dest is None else Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "corenlp.zip"
        log.info("downloading %s (about 400 MB)", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:
            raise ConnectionError(
                f"could not download {url}: {err}. This needs internet access; on an offline "
                f"machine, copy {' and '.join(CORENLP_JARS)} into {lib_dir} by hand."
            ) from None
        written = extract_jars(archive, dest)
    if dest.resolve() != lib_dir:
        for jar in written:
            link = lib_dir / jar.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(jar.resolve())
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dalipipe fetch-metric-assets", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dest", help=f"folder for the jars (default: {spice_lib_dir()})")
    parser.add_argument("--url", default=CORENLP_URL, help="the CoreNLP 3.6.0 release zip")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout, seconds")
    args = parser.parse_args(argv)
    setup_logging()
    if spice_missing_reason() is None and args.dest is None:
        log.info("SPICE jars already present in %s", spice_lib_dir())
        return 0
    try:
        written = fetch(args.url, Path(args.dest) if args.dest else None, args.timeout)
    except (ConnectionError, ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 1
    for path in written:
        log.info("wrote %s", path)
    return 0
