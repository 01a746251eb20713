# Acquisition from the synthetic world or from local media files (acquire.source "synthetic" or
# "local"; "audioset" is rules/audioset.smk): one job per part, then the parts of any source are
# gathered.
#   snakemake --cores 2 results/miniature/acquire/manifest.csv
# A clip is the same whatever acquire.parts is (dalipipe/world/synthetic.py,
# dalipipe/data/local.py).

ACQUIRE_LOCAL = ACQUIRE.get("local") or {}


if ACQUIRE["source"] == "synthetic":

    rule acquire_synthetic:
        output:
            directory(f"{RUN}/acquire/part-{{i}}"),
        wildcard_constraints:
            i=r"\d+",
        params:
            p=job_params("world", "acquire.parts"),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/acquire_synthetic/part-{{i}}.log",
        benchmark:
            f"{BENCHMARKS}/acquire_synthetic-{{i}}.tsv",
        threads: 2  # ffmpeg encodes one clip while Python draws the next
        resources:
            mem_mb=2000,
            runtime=60,
        shell:
            "dalipipe acquire-synthetic --params {params.p:q} --part {wildcards.i}"
            " --workers {threads} --out {output:q} > {log} 2>&1"


if ACQUIRE["source"] == "local":
    if not ACQUIRE_LOCAL.get("path"):
        raise WorkflowError("acquire.source is 'local' but acquire.local.path is not set")
    require_existing_paths("acquire.local.path")

    rule acquire_local:
        input:
            ACQUIRE_LOCAL["path"],
        output:
            directory(f"{RUN}/acquire/part-{{i}}"),
        wildcard_constraints:
            i=r"\d+",
        params:
            p=job_params("acquire.parts", "acquire.local"),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/acquire_local/part-{{i}}.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=30,
        shell:
            "dalipipe acquire-local --params {params.p:q} --source {input:q}"
            " --part {wildcards.i} --out {output:q} > {log} 2>&1"


rule acquire_gather:
    input:
        expand(f"{RUN}/acquire/part-{{i}}", i=PARTS),
    output:
        manifest=f"{RUN}/acquire/manifest.csv",
        metadata=f"{RUN}/acquire/metadata.jsonl",
        summary=f"{RUN}/acquire/summary.json",
    params:
        out=parent_of("manifest"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/acquire_gather.log",
    benchmark:
        f"{BENCHMARKS}/acquire_gather.tsv",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "dalipipe gather-manifests {input:q} --out {params.out:q} > {log} 2>&1"
