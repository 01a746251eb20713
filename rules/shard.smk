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
SHARD_EXCLUDE_ARG = (
    " ".join(["--exclude", *map(shlex.quote, SHARD_EXCLUDE)]) if SHARD_EXCLUDE else ""
)
SHARD_COMMAND = (
    "dalipipe shard --params {params.p:q} --extract {input.extract:q}"
    " --metadata {input.metadata:q} {params.kept} {params.exclude} --split {params.split}"
    " --out {output:q} > {log} 2>&1"
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
        p=stage_params("extract", "shard"),
        split="align",
        kept=shard_kept_arg,
        exclude=SHARD_EXCLUDE_ARG,
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
        p=stage_params("extract", "shard"),
        split="pseudolabel",
        kept="",
        exclude=SHARD_EXCLUDE_ARG,
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
        p=stage_params("extract", "shard"),
        split="prefix",
        kept="",
        exclude=SHARD_EXCLUDE_ARG,
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
        exclude="",  # the evaluation clips themselves
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
