"""A model named by a folder or by a Hub id, `owner/name[@revision]`.

A Hub id is fetched with huggingface_hub into its usual cache (HF_HUB_CACHE, HF_HOME/hub)
at the revision given, else at the commit `main` points to, and read from the cache
afterwards without the network. The base LLaVA a captioner folder names (captioner.json
`base` and `revision`) is resolved the same way (`dalipipe.data.hf_cache.fetch_model`), so a
model shared on the Hub runs on a machine that has only its id.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from dalipipe.data.hf_cache import (
    HubFetchError,
    HubModel,
    default_cache,
    fetch_model,
    is_hub_id,
    snapshot_complete,
    snapshot_folder,
)

MODEL_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")


class ModelNotFound(ValueError):
    """Neither a captioner folder nor a Hub id that can be fetched; the message says why."""


def parse_model_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for `owner/name[@revision]`; None for anything else."""
    match = MODEL_ID.match(name)
    if match is None or not is_hub_id(match["repo"]):
        return None
    return match["repo"], match["revision"]


@contextlib.contextmanager
def _online():
    """huggingface_hub may reach the endpoint inside (HF_HUB_OFFLINE=1 is for loading)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def fetch_captioner(
    repo_id: str, revision: str | None, *, cache: Path, endpoint: str | None = None
) -> Path:
    """The snapshot folder of a captioner repository: from the cache when it is there,
    else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    revision = revision or "main"
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        pass
    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        with _online():
            folder = snapshot_download(
                repo_id, revision=revision, cache_dir=cache, endpoint=endpoint
            )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelNotFound(
            f"model {repo_id}@{revision}: not in the cache {cache}, and {where} did not give it "
            f"({type(err).__name__}: {first})"
        ) from None
    return Path(folder)


def resolve_model(
    model: str | os.PathLike,
    *,
    cache: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> tuple[Path, Path | None]:
    """(the captioner folder, its base model's local folder or None when captioner.json's
    `base` is itself a folder) for a folder or a Hub id `owner/name[@revision]`."""
    from dalipipe.models.artifacts import read_config

    cache = Path(cache) if cache else default_cache()
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")  # as set now, not at import
    name = str(model)
    if Path(name).exists():
        folder = Path(name)
    else:
        hub_id = parse_model_id(name)
        if hub_id is None:
            raise ModelNotFound(
                f"model {name}: no such folder, and not a Hub id (owner/name[@revision])"
            )
        folder = fetch_captioner(*hub_id, cache=cache, endpoint=endpoint)
    if not (folder / "captioner.json").is_file():
        raise ModelNotFound(f"model {name}: {folder} has no captioner.json (not a captioner)")
    info = read_config(folder / "captioner.json")
    base = str(info.get("base", ""))
    if not base or (folder / base).exists() or Path(base).exists() or not is_hub_id(base):
        return folder, None
    base_model = HubModel(f"the base of {name}", base, str(info.get("revision") or "main"))
    if snapshot_complete(cache, base_model.repo_id, base_model.revision):
        # already in the cache (a workflow's fetch rule, `hf download`, an earlier call):
        # nothing to fetch, so a compute node without internet loads it as it is
        return folder, snapshot_folder(cache, base_model.repo_id, base_model.revision)
    try:
        with _online():
            base_folder = fetch_model(
                base_model, base_model.marker(cache), cache=cache, endpoint=endpoint
            )
    except HubFetchError as err:
        raise ModelNotFound(str(err)) from None
    return folder, base_folder
