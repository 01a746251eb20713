"""The Stanford CoreNLP 3.6.0 jars that SPICE (and so SPIDEr) needs, and SPICE run with them.

    dalipipe fetch-metric-assets [--dest DIR] [--url URL]
    dalipipe fetch-metric-assets --archive ZIP --dest DIR      (rules/fetch.smk: corenlp_jars)

Without ``--archive`` it downloads the release (needs internet: run it once on a login node)
and puts the two jars into pycocoevalcap's ``spice/lib`` folder, where its SPICE jar looks for
them on its class path; with ``--dest`` they go elsewhere and are linked into that folder.
With ``--archive`` (the release zip, downloaded and checked by the workflow's `fetch` rule) the
jars are only extracted into ``DIR``, which appears complete or not at all; config
``evaluate.corenlp`` names that folder and ``run_spice`` puts it on SPICE's class path, so
nothing is written into the installed package (a cluster's environment may be read-only).
Without the jars, ``dalipipe score`` reports SPICE and SPIDEr as "not computed" with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
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


def spice_missing_reason(lib_dir: str | Path | None = None) -> str | None:
    """None when SPICE can run with the jars in ``lib_dir`` (default: pycocoevalcap's); else
    why not, in words a user can act on."""
    if shutil.which("java") is None:
        return "java not found on PATH (SPICE needs Java 8+)"
    missing = missing_jars(lib_dir)
    if missing:
        how = (
            "run `dalipipe fetch-metric-assets`"
            if lib_dir is None
            else "evaluate.corenlp; fetched by the workflow where config `fetch.corenlp` is set"
        )
        return f"Stanford CoreNLP 3.6.0 missing ({', '.join(str(p) for p in missing)}; {how})"
    return None


def spice_command(jars_dir: str | Path, in_file: Path, out_file: Path) -> list[str]:
    """java running pycocoevalcap's SPICE with the CoreNLP jars of ``jars_dir`` on the class
    path (its other libraries come from its manifest, beside the installed jar)."""
    spice_jar = spice_lib_dir().parent / "spice-1.0.jar"
    jars = [str(Path(jars_dir).resolve() / name) for name in CORENLP_JARS]
    classpath = os.pathsep.join([str(spice_jar), *jars])
    return [
        "java",
        "-Xmx8G",
        "-cp",
        classpath,
        "edu.anu.spice.SpiceScorer",
        str(in_file),
        "-out",
        str(out_file),
        "-subset",
        "-silent",
    ]


def run_spice(gts: dict, res: dict, jars_dir: str | Path) -> tuple[float, list[float]]:
    """SPICE F-score, corpus and per clip, as pycocoevalcap's Spice computes it, but with its
    input, output and no parse cache in a temporary folder (not beside the installed jar)."""
    ids = sorted(gts)
    if sorted(res) != ids:
        raise ValueError("SPICE: predictions and references name different clips")
    rows = [{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in ids]
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        in_file, out_file = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_file.write_text(json.dumps(rows))
        subprocess.run(spice_command(jars_dir, in_file, out_file), check=True, cwd=tmp)
        results = {r["image_id"]: r for r in json.loads(out_file.read_text())}
    scores = [float(results[k]["scores"]["All"]["f"]) for k in ids]
    return sum(scores) / len(scores), scores


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


def extract_to_folder(archive: Path, dest: Path) -> list[Path]:
    """The two jars of ``archive`` into the folder ``dest``, which appears only with both."""
    if dest.exists():
        log.info("%s exists: nothing to extract", dest)
        return [dest / name for name in CORENLP_JARS]
    with atomic_path(dest, directory=True) as tmp:
        extract_jars(archive, tmp)
    return [dest / name for name in CORENLP_JARS]


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
    parser.add_argument(
        "--archive", help="extract from this release zip (downloaded already) into --dest only"
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.archive:
        if not args.dest:
            parser.error("--archive needs --dest (the folder of config evaluate.corenlp)")
        try:
            written = extract_to_folder(Path(args.archive), Path(args.dest))
        except (ValueError, FileNotFoundError) as err:
            log.error("%s", err)
            return 1
        log.info("%s: %s", args.dest, ", ".join(p.name for p in written))
        return 0
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
