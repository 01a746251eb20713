# Shared by all rule files (config validation, the run directory, stage parameters).
import copy
import json
import os
import re
import shlex

from dalipipe.config import ConfigError, fill_defaults, validate_config

# every key a preset leaves out takes its default from dalipipe/resources/config.schema.yaml
fill_defaults(config)
try:
    validate_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

RUN = f"results/{config['run']}"
# each rule's log, per run, so the miniature and a preset never overwrite each other's
LOGS = f"logs/{config['run']}"
# each job's wall and CPU time (Snakemake's benchmark table: s, cpu_time, max_rss), per run
BENCHMARKS = f"{RUN}/benchmarks"
# every rule's software under `--sdm conda` (the path is relative to the rule files)
CONDA_ENV = "../envs/dalipipe.yaml"


# The config sections several rule files read, defined here before any rule file uses them.
ACQUIRE = config["acquire"]
PARTS = range(ACQUIRE.get("parts", 1))  # acquire, extract and filter run one job per part
AUDIOSET = ACQUIRE.get("audioset") or {}
FILTER = config.get("filter") or {}
# files of YouTube ids never to train on: inputs of the AudioSet selection and the shards
EXCLUDE_ID_LISTS = FILTER.get("exclude_id_lists") or []
EVAL = config.get("evaluate") or {}
# a set configured as null is off (presets such as paper.yaml switch off the miniature's)
EVAL_DATASETS = [
    name for name, spec in (EVAL.get("datasets") or {"miniature": {}}).items() if spec is not None
]
EVAL_METHODS = EVAL.get("methods") or (config.get("align") or {}).get("methods") or []
EVAL_DISTILLED = (
    EVAL_METHODS if EVAL.get("distilled_methods") is None else EVAL["distilled_methods"]
)
if not any(kind.endswith("distilled") for kind in EVAL.get("systems") or ["audio_distilled"]):
    EVAL_DISTILLED = []
# what a stage that loads the base captioner reads of config `models`
CAPTIONER_SETTINGS = ("models.captioner", "models.captioner_revision", "models.options")


def job_params(*paths):
    """The params function of a rule: the job's `--params` JSON, holding `seed`, `device` and
    exactly the config values the job reads.

    Each path is a dotted config key (`align.ot`) and may name a wildcard of the job
    (`align.per_method.{method}`); a leading `-` takes out what an earlier path brought in
    (`-evaluate.examples`). A key the config does not set is left out. Snakemake reruns a job
    whose params changed, so a config edit reruns exactly the jobs that read the value, and what
    follows them.
    """

    def params(wildcards):
        payload = {"seed": config["seed"], "device": config["device"]}
        for path in paths:
            keys = path.lstrip("-").format_map(dict(wildcards.items())).split(".")
            if path.startswith("-"):
                parent = payload
                for key in keys[:-1]:
                    parent = parent.get(key) if isinstance(parent, dict) else None
                if isinstance(parent, dict):
                    parent.pop(keys[-1], None)
                continue
            value = config
            for key in keys:
                value = value.get(key, KeyError) if isinstance(value, dict) else KeyError
            if value is KeyError:
                continue
            parent = payload
            for key in keys[:-1]:
                parent = parent.setdefault(key, {})
            parent[keys[-1]] = copy.deepcopy(value)
        return json.dumps(payload, sort_keys=True)

    return params


def require_existing_paths(*keys):
    """Stop before any job when a configured input path does not exist, naming the key."""
    for key in keys:
        node = config_value(key)
        values = node if isinstance(node, list) else [node]
        for value in values:
            if value is not None and not os.path.exists(str(value)):
                raise WorkflowError(f"config key {key}: path {value!r} does not exist")


def _captioner():
    """config `models.captioner`: "bootstrap" (the miniature's own), a directory, or a hub id."""
    name = (config.get("models") or {}).get("captioner", "bootstrap")
    return f"{RUN}/models/llava" if name == "bootstrap" else str(name)


# Rules pass CAPTIONER on the command line and list CAPTIONER_INPUT as an input: a hub id is
# no file input (the job reads it from the Hugging Face cache).
CAPTIONER = _captioner()
CAPTIONER_INPUT = [CAPTIONER] if CAPTIONER.startswith(RUN) or os.path.exists(CAPTIONER) else []


def accelerate_launcher(wildcards, resources):
    """`dalipipe`, or one process per GPU through accelerate when the job holds several GPUs."""
    gpus = str(getattr(resources, "gpu", None) or getattr(resources, "gres", None) or 0)
    count = int(re.findall(r"\d+", gpus)[-1]) if re.search(r"\d", gpus) else 0
    if count > 1:
        return f"accelerate launch --multi_gpu --num_processes {count} -m dalipipe.cli"
    return "dalipipe"


# Input and parameter functions of the rule files (kept here, as Snakemake's linter asks for
# functions apart from rules).


def shard_inputs(wildcards):
    """Every split reads all extract parts; align only the filter's kept clips (when it ran);
    the training splits also read the evaluation-id lists they must drop."""
    inputs = {
        "extract": expand(f"{RUN}/extract/part-{{i}}", i=PARTS),
        "metadata": f"{RUN}/acquire/metadata.jsonl",
    }
    if wildcards.split == "align" and FILTER.get("enabled", False):
        inputs["kept"] = f"{RUN}/filter/kept.txt"
    if wildcards.split != "test":
        inputs["exclude"] = EXCLUDE_ID_LISTS
    return inputs


def shard_params(wildcards):
    """The evaluation-id lists only for the training splits, and only when there are some, so
    the test split and a run without any keep their params (and shards)."""
    exclusions = ["filter.exclude_id_lists"] if wildcards.split != "test" and EXCLUDE_ID_LISTS else []
    return job_params("shard", "extract.keep_wav", *exclusions)(wildcards)


def shard_kept_arg(wildcards, input):
    kept = input.get("kept")
    return f"--kept {shlex.quote(str(kept))}" if kept else ""


def align_inputs(wildcards):
    shards = {"shards": f"{RUN}/shards/align", "val": f"{RUN}/shards/test"}
    return {
        **shards,
        "captioner": CAPTIONER_INPUT,
        "hub": HUB_CAPTIONER,
        "checkpoint": AUDIO_ENCODER_CHECKPOINT,
    }


def align_epochs(wildcards):
    """A method's epochs, its priority: where jobs wait for cores, the longest alignment starts
    first (two one-thread jobs share 2 cores; the longest last would finish alone)."""
    per_method = config["align"]["per_method"].get(wildcards.method) or {}
    return per_method.get("epochs", config["align"]["epochs"])


def evaluate_inputs(wildcards):
    inputs = {
        "captioner": CAPTIONER_INPUT,
        "hub": HUB_CAPTIONER,
        "prefix": f"{RUN}/prefix",
        "align": expand(f"{RUN}/align/{{m}}", m=EVAL_METHODS),
        "distill": expand(f"{RUN}/distill/{{m}}", m=EVAL_DISTILLED),
    }
    if wildcards.dataset == "miniature":
        inputs["data"] = f"{RUN}/shards/test"
    else:
        inputs["data"] = [EVAL["datasets"][wildcards.dataset][k] for k in ("csv", "media")]
    return inputs


def report_curves(wildcards):
    """Training curves that exist after their stage ran (curve.csv inside each output folder)."""
    return [f"{RUN}/align/{m}" for m in EVAL_METHODS] + [f"{RUN}/prefix"]


def captioner_arg(wildcards, input):
    """The captioner on the command line: the input path when it is a file input."""
    return input.captioner if CAPTIONER_INPUT else CAPTIONER


def parent_of(name):
    """A params function: the folder holding output `name` (outputs written side by side)."""
    return lambda wildcards, output: os.path.dirname(output[name])


# rules/fetch.smk: the inputs of a paper-scale config that are fetched when missing (config
# `fetch`). A path that exists is used as it is: Snakemake makes no job for it.

# the official CAV-MAE weights the align stage starts from (models.audio_encoder.checkpoint)
AUDIO_ENCODER_CHECKPOINT = [
    str(p) for p in [((config.get("models") or {}).get("audio_encoder") or {}).get("checkpoint")]
    if p
]
# the SHA-256 of every download without a published checksum, recorded at first download
FETCH_RECORD = "data/fetch-record.json"


def config_value(key):
    """The value at a dotted config key (``acquire.audioset.ontology``), or None."""
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _beside(path, name):
    return os.path.join(os.path.dirname(str(path)), name) if path else None


def _url_file_name(url):
    from urllib.parse import unquote, urlparse

    return os.path.basename(unquote(urlparse(url).path))


def fetch_places():
    """{name: (path, entry)} for every entry of config `fetch` whose input is configured."""
    audiocaps_csv = config_value("evaluate.datasets.audiocaps.csv")
    clotho_media = config_value("evaluate.datasets.clotho.media")
    places = {
        "audioset_balanced_train": config_value("acquire.audioset.segments.balanced_train"),
        "audioset_unbalanced_train": config_value("acquire.audioset.segments.unbalanced_train"),
        "audioset_eval": config_value("acquire.audioset.segments.eval"),
        "audioset_class_index": config_value("acquire.audioset.class_index"),
        "audioset_ontology": config_value("acquire.audioset.ontology"),
        "audiocaps_train": _beside(audiocaps_csv, "train.csv"),
        "audiocaps_val": _beside(audiocaps_csv, "val.csv"),
        "audiocaps_test": audiocaps_csv,
        "clotho_captions_evaluation": config_value("evaluate.datasets.clotho.csv"),
        "cavmae_checkpoint": (AUDIO_ENCODER_CHECKPOINT or [None])[0],
        "prefix_pairs": _beside(config_value("prefix.pairs"), "prefixDS.json"),
        "fense_sentence_encoder": config_value("evaluate.fense.sentence_encoder"),
        "fense_echecker": config_value("evaluate.fense.echecker"),
        "fense_echecker_encoder": config_value("evaluate.fense.echecker_encoder"),
    }
    found = {}
    for name, entry in (config.get("fetch") or {}).items():
        if not entry:
            continue
        path = places.get(name)
        if name == "clotho_audio_evaluation" and clotho_media:
            path = _beside(os.path.normpath(clotho_media), _url_file_name(entry["url"]))
        if name == "corenlp" and config_value("evaluate.corenlp"):  # the zip beside the jars
            folder = os.path.normpath(config_value("evaluate.corenlp"))
            path = _beside(folder, _url_file_name(entry["url"]))
        if path:
            found[name] = (os.path.normpath(path), entry)
    return found


# Only a missing path gets a rule: a file the user has (or an earlier run fetched) is a plain
# input from then on, which no edit of a rule or of a URL can make Snakemake fetch again (and
# rerun everything after it). The same holds for what rules/fetch.smk makes of the downloads.
FETCH_PATHS = {name: path for name, (path, _) in fetch_places().items()}
FETCH_TARGETS = {
    path: (name, entry)
    for name, (path, entry) in fetch_places().items()
    if not os.path.exists(path)
}


def fetch_checksum_arg(wildcards):
    """--md5 X or --sha256 X where the publisher gives one, else the record file."""
    _, entry = FETCH_TARGETS[wildcards.fetched]
    for kind in ("md5", "sha256"):
        if entry.get(kind):
            return f"--{kind} {entry[kind]}"
    return f"--record {shlex.quote(FETCH_RECORD)}"


# The hub models the config loads (dalipipe/data/hf_cache.py), fetched into the Hugging Face
# cache (HF_HUB_CACHE or HF_HOME, as the jobs see it) where config `fetch.hf_models` is set. A
# model the cache holds already, or a folder given in place of a hub id, gets no job and no
# input; for one fetched, the marker its job writes in the cache is an input of every stage
# that loads it, so they wait for it (rules/fetch.smk: fetch_hf_model).
HF_CACHE = None
HF_MARKERS = {}  # config key (models.captioner, filter.gpt2, ...) -> marker path
HF_FETCH = {}  # the marker's name part (the rule's wildcard) -> the model to fetch
if (config.get("fetch") or {}).get("hf_models"):
    from dalipipe.data import hf_cache

    HF_CACHE = str(hf_cache.default_cache())
    for _key, _model in hf_cache.hub_models_by_key(config).items():
        _marker = str(_model.marker(HF_CACHE))
        if not os.path.exists(_marker):
            if hf_cache.snapshot_complete(HF_CACHE, _model.repo_id, _model.revision):
                continue
            HF_FETCH[_model.name] = _model
        HF_MARKERS[_key] = _marker


def hub_markers(*keys):
    """The cache markers of the hub models at these config keys: a stage's input."""
    return sorted({HF_MARKERS[k] for k in keys if k in HF_MARKERS})


HUB_CAPTIONER = hub_markers("models.captioner")


# acquire.audioset's yt-dlp settings only: the clip downloads of rules/fetch.smk
youtube_params = job_params(
    *(f"acquire.audioset.{key}" for key in ("url_template", "format", "height", "retries",
      "backoff_s", "rate_limit", "socket_timeout", "cookies", "ytdlp_options"))
)  # fmt: skip


# rules/experiments.smk: the prefix pairs of one point of the prefix-pair sweep
def sweep_pairs(wildcards):
    """The pairs a sweep point trains on. A point beyond the miniature's prefix split stops the
    plan, but only a plan that asks for the sweep: a smaller world still runs everything else."""
    given = (config.get("prefix") or {}).get("pairs")
    # the miniature's prefix split is known before any job
    prefix_clips = ((config.get("world") or {}).get("splits") or {}).get("prefix")
    synthetic = ACQUIRE.get("source", "synthetic") == "synthetic"
    if not given and synthetic and prefix_clips is not None:
        if int(wildcards.n) > prefix_clips:
            raise WorkflowError(
                f"config key experiments.prefix_pairs: {wildcards.n} pairs asked for, and the "
                f"prefix split has {prefix_clips} clips (world.splits.prefix)"
            )
    return given or f"{RUN}/shards/prefix"
