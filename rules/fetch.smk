# The public inputs of a paper-scale config, fetched when missing (config `fetch`, set in
# configs/paper.yaml; config.yaml has none, so the miniature graph has none of these rules).
#   snakemake --profile slurm -n          lists these jobs for every input not yet on disk
# A path that exists is used as it is: it gets no rule, so no job (rules/common.smk,
# FETCH_TARGETS); delete it to fetch it again. `dalipipe fetch`
# downloads resumably and renames a file into place only complete and verified: against the
# publisher's md5/sha256 where config `fetch` gives one, else against the SHA-256 recorded at
# the first download in data/fetch-record.json. The HTTP downloads, the unpacking and the small
# steps around the prefix pairs are local rules (they run where Snakemake runs, the login
# node, which has internet); the two YouTube clip downloads (AudioCaps test clips, the 16
# prefix clips) are jobs like audioset_download (docs/cluster.md, offline compute nodes).

FETCH_AUDIOCAPS = config_value("evaluate.datasets.audiocaps") or {}
FETCH_CLOTHO = config_value("evaluate.datasets.clotho") or {}
FETCH_PREFIX_PAIRS = config_value("prefix.pairs")
# entries with `files` are folders (a model's files), fetched by fetch_folder
FETCH_FOLDERS = {p: t for p, t in FETCH_TARGETS.items() if t[1].get("files")}
FETCH_FILES = {p: t for p, t in FETCH_TARGETS.items() if not t[1].get("files")}


if FETCH_FILES:

    localrules:
        fetch,

    rule fetch:
        output:
            "{fetched}",
        wildcard_constraints:
            fetched="|".join(re.escape(path) for path in FETCH_FILES),
        params:
            url=lambda wildcards: FETCH_TARGETS[wildcards.fetched][1]["url"],
            checksum=fetch_checksum_arg,
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/{{fetched}}.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=240,  # minutes; the largest files (unbalanced CSV, the .7z) are ~1 GB
        shell:
            "dalipipe fetch {params.url:q} --out {output:q} {params.checksum} > {log} 2>&1"


# A model as the files of its folder (FENSE's sentence encoder, the echecker's BERT config and
# tokenizer): each file checked against data/fetch-record.json like any download.
if FETCH_FOLDERS:

    localrules:
        fetch_folder,

    rule fetch_folder:
        output:
            directory("{fetched_folder}"),
        wildcard_constraints:
            fetched_folder="|".join(re.escape(path) for path in FETCH_FOLDERS),
        params:
            url=lambda wildcards: FETCH_FOLDERS[wildcards.fetched_folder][1]["url"],
            files=lambda wildcards: FETCH_FOLDERS[wildcards.fetched_folder][1]["files"],
            record=FETCH_RECORD,
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/{{fetched_folder}}.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=60,
        shell:
            "dalipipe fetch {params.url:q} --files {params.files:q} --out {output:q}"
            " --record {params.record:q} > {log} 2>&1"


# The hub models the config loads, into the Hugging Face cache at their pinned revisions
# (rules/common.smk: HF_FETCH), from config `fetch.hf_models.url` (the Hub or a mirror); the
# marker each job writes in the cache lists the files, and the stages that load the model wait
# for it. Compute nodes then read the cache with HF_HUB_OFFLINE=1.
if HF_FETCH:

    localrules:
        fetch_hf_model,

    rule fetch_hf_model:
        output:
            f"{HF_CACHE}/dalipipe-{{hf_model}}.done",
        wildcard_constraints:
            hf_model="|".join(re.escape(name) for name in HF_FETCH),
        params:
            repo=lambda wildcards: HF_FETCH[wildcards.hf_model].repo_id,
            revision=lambda wildcards: HF_FETCH[wildcards.hf_model].revision,
            key=lambda wildcards: HF_FETCH[wildcards.hf_model].key,
            endpoint=config["fetch"]["hf_models"]["url"],
            cache=parent_of(0),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/hf/{{hf_model}}.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=600,  # LLaVA-1.5-7B is ~14 GB, BLIP-2 OPT-2.7B ~15 GB
        shell:
            "dalipipe fetch-hf {params.repo:q} --revision {params.revision:q} --key {params.key:q}"
            " --endpoint {params.endpoint:q} --cache {params.cache:q} --marker {output:q}"
            " > {log} 2>&1"


# Stanford CoreNLP 3.6.0 for SPICE: its release zip (fetched by `fetch`, checksum recorded)
# gives two jars to the folder evaluate.corenlp, which the evaluate stage puts on SPICE's class
# path (nothing is written into the installed pycocoevalcap).
if "corenlp" in FETCH_PATHS and not os.path.exists(config_value("evaluate.corenlp")):

    localrules:
        corenlp_jars,

    rule corenlp_jars:
        input:
            FETCH_PATHS["corenlp"],
        output:
            directory(os.path.normpath(config_value("evaluate.corenlp"))),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/corenlp_jars.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "dalipipe fetch-metric-assets --archive {input:q} --dest {output:q} > {log} 2>&1"


if "clotho_audio_evaluation" in FETCH_PATHS and not os.path.exists(FETCH_CLOTHO["media"]):

    localrules:
        unpack_clotho_audio,

    rule unpack_clotho_audio:
        input:
            FETCH_PATHS["clotho_audio_evaluation"],
        output:
            directory(FETCH_CLOTHO["media"]),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/unpack_clotho_audio.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        shell:
            "dalipipe paper-inputs unpack {input:q} --out {output:q} > {log} 2>&1"


# The AudioCaps test clips: the CSV's YouTube segments, downloaded like AudioSet
if (
    FETCH_PATHS
    and FETCH_AUDIOCAPS.get("csv")
    and FETCH_AUDIOCAPS.get("media")
    and not os.path.exists(FETCH_AUDIOCAPS["media"])
):

    localrules:
        audiocaps_selection,

    rule audiocaps_selection:
        input:
            FETCH_AUDIOCAPS["csv"],
        output:
            f"{FETCH_AUDIOCAPS['media']}.selection/part-0.jsonl",
        params:
            out=parent_of(0),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/audiocaps_selection.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "dalipipe paper-inputs audiocaps-selection --csv {input:q} --out {params.out:q}"
            " > {log} 2>&1"

    rule audiocaps_download:
        input:
            selection=f"{FETCH_AUDIOCAPS['media']}.selection/part-0.jsonl",
            cookies=[AUDIOSET["cookies"]] if AUDIOSET.get("cookies") else [],
        output:
            directory(FETCH_AUDIOCAPS["media"]),
        params:
            p=youtube_params,
            selection=lambda wildcards, input: os.path.dirname(input.selection),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/audiocaps_download.log",
        threads: 1  # yt-dlp, rate-limited (acquire.audioset.rate_limit)
        resources:
            mem_mb=4000,
            runtime=600,  # ~1,000 clips; a rerun resumes from <media>.work/
        shell:
            "dalipipe acquire-audioset --params {params.p:q} --selection {params.selection:q}"
            " --part 0 --out {output:q} > {log} 2>&1"


# The prefix pairs: the authors' prefixDS.json names 16 AudioSet videos and an audio caption
# each; their segments are downloaded and the frame at 5 s of each (the authors' frame_5) is
# paired with the caption.
if "prefix_pairs" in FETCH_PATHS and FETCH_PREFIX_PAIRS and not os.path.exists(FETCH_PREFIX_PAIRS):
    FETCH_PREFIX_DIR = os.path.dirname(FETCH_PREFIX_PAIRS) or "."

    localrules:
        prefix_selection,
        prefix_pairs,

    rule prefix_selection:
        input:
            pairs=FETCH_PATHS["prefix_pairs"],
            audiocaps=[FETCH_PATHS[k] for k in ["audiocaps_train"] if k in FETCH_PATHS],
            segments=list((config_value("acquire.audioset.segments") or {}).values()),
        output:
            f"{FETCH_PREFIX_DIR}/clips.selection/part-0.jsonl",
        params:
            out=parent_of(0),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/prefix_selection.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "dalipipe paper-inputs prefix-selection --pairs {input.pairs:q}"
            " --audiocaps {input.audiocaps:q} --segments {input.segments:q}"
            " --out {params.out:q} > {log} 2>&1"

    rule prefix_download:
        input:
            selection=f"{FETCH_PREFIX_DIR}/clips.selection/part-0.jsonl",
            cookies=[AUDIOSET["cookies"]] if AUDIOSET.get("cookies") else [],
        output:
            directory(f"{FETCH_PREFIX_DIR}/clips"),
        params:
            p=youtube_params,
            selection=lambda wildcards, input: os.path.dirname(input.selection),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/prefix_download.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        shell:
            "dalipipe acquire-audioset --params {params.p:q} --selection {params.selection:q}"
            " --part 0 --out {output:q} > {log} 2>&1"

    rule prefix_pairs:
        input:
            pairs=FETCH_PATHS["prefix_pairs"],
            clips=f"{FETCH_PREFIX_DIR}/clips",
        output:
            pairs=FETCH_PREFIX_PAIRS,
            frames=directory(f"{FETCH_PREFIX_DIR}/frames"),
        params:
            # the frames' square where the extract stage crops them (extract.frame_crop)
            square=(
                f"--square {config_value('extract.frame_short_side')}"
                if config_value("extract.frame_crop")
                else ""
            ),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/fetch/prefix_pairs.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "dalipipe paper-inputs prefix-pairs --pairs {input.pairs:q} --clips {input.clips:q}"
            " --out {output.pairs:q} --frames {output.frames:q} {params.square} > {log} 2>&1"
