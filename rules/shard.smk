# Shards: one webdataset directory per split, from all extract parts and the gathered metadata.
#   snakemake --cores 2 results/miniature/shards/align
# The align split keeps only the filter's kept clips when filter.enabled; the other splits take
# every extracted clip of their split. Every training split (not test) drops the clips whose
# YouTube id is in filter.exclude_id_lists, whatever the source and whether the filter ran.
# See dalipipe/data/shard.py for the layout.

SHARD_EXTRACT_PARTS = expand(
    f"{RUN}/extract/part-{{i}}", i=range(config["acquire"].get("parts", 1))
)
SHARD_METADATA = f"{RUN}/acquire/metadata.jsonl"
SHARD_EXCLUDE = (config.get("filter") or {}).get("exclude_id_lists") or []
# the training splits' params: the evaluation-id lists only when there are some, so a run
# without any keeps the params (and the shards) it had
SHARD_TRAIN_PARAMS = stage_params("extract", "shard")
if SHARD_EXCLUDE:
    SHARD_TRAIN_PARAMS = json.dumps(
        {**json.loads(SHARD_TRAIN_PARAMS), "filter": {"exclude_id_lists": SHARD_EXCLUDE}},
        sort_keys=True,
    )
SHARD_COMMAND = (
    "dalipipe shard --params {params.p:q} --extract {input.extract:q}"
    " --metadata {input.metadata:q} {params.kept} --split {params.split} --out {output:q}"
    " > {log} 2>&1"
)


rule shard_align:
    input:
        extract=SHARD_EXTRACT_PARTS,
        metadata=SHARD_METADATA,
        kept=f"{RUN}/filter/kept.txt" if config.get("filter", {}).get("enabled", False) else [],
        exclude=SHARD_EXCLUDE,
    output:
        directory(f"{RUN}/shards/align"),
    params:
        p=SHARD_TRAIN_PARAMS,
        split="align",
        kept=shard_kept_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/shard/align.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        SHARD_COMMAND


rule shard_pseudolabel:
    input:
        extract=SHARD_EXTRACT_PARTS,
        metadata=SHARD_METADATA,
        exclude=SHARD_EXCLUDE,
    output:
        directory(f"{RUN}/shards/pseudolabel"),
    params:
        p=SHARD_TRAIN_PARAMS,
        split="pseudolabel",
        kept="",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/shard/pseudolabel.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        SHARD_COMMAND


rule shard_prefix:
    input:
        extract=SHARD_EXTRACT_PARTS,
        metadata=SHARD_METADATA,
        exclude=SHARD_EXCLUDE,
    output:
        directory(f"{RUN}/shards/prefix"),
    params:
        p=SHARD_TRAIN_PARAMS,
        split="prefix",
        kept="",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/shard/prefix.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        SHARD_COMMAND


rule shard_test:
    input:
        extract=SHARD_EXTRACT_PARTS,
        metadata=SHARD_METADATA,
    output:
        directory(f"{RUN}/shards/test"),
    params:
        p=stage_params("extract", "shard"),
        split="test",
        kept="",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/shard/test.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        SHARD_COMMAND
