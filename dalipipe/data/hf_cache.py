"""Fill the Hugging Face cache with a hub model at its pinned revision, for offline compute nodes.

    dalipipe fetch-hf REPO_ID --revision COMMIT --marker FILE [--cache DIR] [--endpoint URL]

``huggingface_hub.snapshot_download`` puts the model's files into the cache (``--cache``, else
huggingface_hub's own: ``HF_HUB_CACHE`` or ``HF_HOME/hub``) as ``hf download`` does: blobs and a
``snapshots/<commit>/`` folder, which stages then read with ``HF_HUB_OFFLINE=1``. Weights in
other frameworks' formats (TensorFlow, Flax, ONNX, ...) are left out, and so are the PyTorch
``.bin`` weights of a model that also has safetensors (transformers loads those first): GPT-2's
repository alone is ~5 GB of formats no stage reads. When everything is there, ``FILE`` (the
rule's output, rules/fetch.smk) is written: JSON naming the model, the revision and the files.

The rules ask for the models a config loads from the hub (``hub_models``) only where config
``fetch.hf_models`` is set, and only when the cache does not already hold them
(``snapshot_complete``): a cache filled by hand, or a local folder in place of a hub id, is
used as it is.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dalipipe.common import atomic_path, setup_logging

log = logging.getLogger(__name__)

# (config key of the model, key of its revision, when the config loads it)
HUB_MODEL_KEYS = (
    ("models.captioner", "models.captioner_revision"),
    ("filter.captioner", "filter.captioner_revision"),
    ("filter.gpt2", "filter.gpt2_revision"),
)
# weights no stage reads (transformers' PyTorch loaders read safetensors, else .bin)
OTHER_FRAMEWORKS = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "*.tflite",
    "*.ot",
    "*.mlmodel",
    "coreml/*",
    "*.gguf",
]
PYTORCH_BIN = ["pytorch_model*.bin"]
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HubFetchError(RuntimeError):
    """A model that could not be put into the cache: the message says which, and what to do."""


@dataclass(frozen=True)
class HubModel:
    key: str  # the config key naming it (the first, when several name the same model)
    repo_id: str
    revision: str

    @property
    def name(self) -> str:
        """The model and revision as one file-name part (the marker's, the rule's wildcard)."""
        return f"{self.repo_id.replace('/', '--')}-{self.revision}"

    def marker(self, cache: str | os.PathLike) -> Path:
        return Path(cache) / f"dalipipe-{self.name}.done"


def _value(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def is_hub_id(name: str) -> bool:
    """A hub id (``org/name`` or ``name``), not a folder: a path that exists, or one under
    results/ (the miniature's bootstrap captioner), is a folder."""
    return (
        name != "bootstrap"
        and not name.startswith(("results/", "/", "."))
        and not os.path.exists(name)
        and HUB_ID.match(name) is not None
    )


def hub_models(config: dict) -> list[HubModel]:
    """Every model ``config`` loads from the hub, once per (id, revision)."""
    models, seen = [], set()
    for model in hub_models_by_key(config).values():
        if (model.repo_id, model.revision) not in seen:
            seen.add((model.repo_id, model.revision))
            models.append(model)
    return models


def hub_models_by_key(config: dict) -> dict[str, HubModel]:
    """{config key: model} for every model ``config`` loads from the hub with from_pretrained:
    the captioner of every DALI stage, and the caption filter's captioner and GPT-2 when the
    filter runs (GPT-2 only as its text encoder). A revision left null is ``main``."""
    filtering = (_value(config, "filter.enabled") is not False) and config.get("filter")
    models = {}
    for key, revision_key in HUB_MODEL_KEYS:
        if key.startswith("filter.") and not filtering:
            continue
        if key == "filter.gpt2" and _value(config, "filter.text_encoder") != "gpt2":
            continue
        name = _value(config, key)
        if not isinstance(name, str):
            continue
        name = name.format(run=config["run"])
        if not is_hub_id(name):
            continue
        models[key] = HubModel(key, name, str(_value(config, revision_key) or "main"))
    return models


def default_cache() -> Path:
    """The cache from_pretrained reads: huggingface_hub's (HF_HUB_CACHE, HF_HOME/hub, ~/.cache)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_folder(cache: str | os.PathLike, repo_id: str, revision: str) -> Path | None:
    """``snapshots/<commit>/`` of the model in the cache (a branch name through ``refs/``)."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = revision
    if not COMMIT.match(revision):
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def snapshot_complete(cache: str | os.PathLike, repo_id: str, revision: str) -> bool:
    """Whether the cache holds the model at ``revision``: its config.json, and every weight
    shard its index names (or a weight file). A download cut short leaves the shards missing;
    a cache filled with ``hf download`` passes."""
    folder = snapshot_folder(cache, repo_id, revision)
    if folder is None or not (folder / "config.json").is_file():
        return False
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            return all((folder / shard).is_file() for shard in shards)
    return any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def ignore_patterns(files: list[str]) -> list[str]:
    """What of a repository's ``files`` not to download (see the module's docstring)."""
    safetensors = any(f.endswith(".safetensors") for f in files)
    return OTHER_FRAMEWORKS + (PYTORCH_BIN if safetensors else [])


def _what_to_do(model: HubModel, cache: Path) -> str:
    return (
        f"check {model.key} and its revision in the config, and config `fetch.hf_models.url` "
        f"(the Hub or a mirror); or fill the cache {cache} yourself "
        f"(`hf download {model.repo_id} --revision {model.revision}`), which is then used as it is"
    )


def fetch_model(
    model: HubModel,
    marker: str | os.PathLike,
    *,
    cache: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download ``model`` into ``cache`` and write ``marker``; returns the snapshot folder."""
    import httpx2  # huggingface_hub's HTTP client: its connection errors
    from huggingface_hub import HfApi, RepoFile, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # the one step that must reach the Hub: HF_HUB_OFFLINE=1, exported for the jobs where
    # they are submitted (docs/cluster.md), does not apply to it
    constants.HF_HUB_OFFLINE = False
    cache = Path(cache) if cache else default_cache()
    marker = Path(marker)
    if marker.exists() and snapshot_complete(cache, model.repo_id, model.revision):
        log.info(
            "%s exists: %s@%s is in the cache, nothing to fetch",
            marker,
            model.repo_id,
            model.revision,
        )
        return snapshot_folder(cache, model.repo_id, model.revision)
    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        listed = [
            entry.path
            for entry in HfApi(endpoint=endpoint).list_repo_tree(
                model.repo_id, revision=model.revision, recursive=True
            )
            if isinstance(entry, RepoFile)
        ]
        skip = [f for f in listed if any(fnmatch.fnmatch(f, p) for p in ignore_patterns(listed))]
        log.info(
            "%s@%s: %d files, %d left out (%s)",
            model.repo_id,
            model.revision,
            len(listed),
            len(skip),
            ", ".join(skip) or "none",
        )
        folder = Path(
            snapshot_download(
                model.repo_id,
                revision=model.revision,
                cache_dir=cache,
                endpoint=endpoint,
                ignore_patterns=ignore_patterns(listed),
            )
        )
    except RevisionNotFoundError:
        raise HubFetchError(
            f"fetch {model.repo_id}: {where} has no revision {model.revision} of it (config "
            f"{model.key}); pin a commit of the model's history ({where}/{model.repo_id}/commits"
            f"/main). Or {_what_to_do(model, cache)}"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise HubFetchError(
            f"fetch {model.repo_id}@{model.revision}: {where} does not serve it "
            f"({type(err).__name__}; a gated model needs `hf auth login` first): "
            f"{_what_to_do(model, cache)}"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, httpx2.HTTPError, OSError) as err:
        raise HubFetchError(
            f"fetch {model.repo_id}@{model.revision} from {where} into {cache} failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). This needs "
            "internet (run it on a login node); run it "
            f"again to resume. Or {_what_to_do(model, cache)}"
        ) from None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if not snapshot_complete(cache, model.repo_id, model.revision):
        raise HubFetchError(
            f"fetch {model.repo_id}@{model.revision}: {folder} lacks its config.json or weights "
            f"after the download (it holds {', '.join(files) or 'nothing'}); no model of "
            f"transformers' kind at this revision? {_what_to_do(model, cache)}"
        )
    record = {
        "repo_id": model.repo_id,
        "revision": model.revision,
        "endpoint": where,
        "snapshot": str(folder),
        "files": {f: (folder / f).stat().st_size for f in files},
    }
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    log.info("%s@%s: %d files in %s", model.repo_id, model.revision, len(files), folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe fetch-hf", description=__doc__)
    parser.add_argument("repo_id", help="the model's hub id, e.g. llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--revision", required=True, help="the pinned commit (or a branch)")
    parser.add_argument("--marker", required=True, help="written when the model is complete")
    parser.add_argument("--cache", help="the Hugging Face hub cache (default: huggingface_hub's)")
    parser.add_argument("--endpoint", help="the Hub or a mirror (default: HF_ENDPOINT or the Hub)")
    parser.add_argument("--key", default="the model", help="the config key naming it (messages)")
    args = parser.parse_args(argv)
    setup_logging()
    model = HubModel(args.key, args.repo_id, args.revision)
    try:
        fetch_model(model, args.marker, cache=args.cache, endpoint=args.endpoint)
    except HubFetchError as err:
        log.error("%s", err)
        return 1
    return 0
