# Shards: one webdataset directory per split, from all extract parts and the gathered metadata.
#   snakemake --cores 2 results/miniature/shards/align
# The align split keeps only the filter's kept clips when filter.enabled; the other splits take
# every extracted clip of their split. Every training split (not test) drops the clips whose
# YouTube id is in filter.exclude_id_lists, whatever the source and whether the filter ran.
# See dalipipe/data/shard.py for the layout.

# minutes per split at miniature size; the Slurm profile sets the paper-scale requests
SHARD_RUNTIME = {"align": 240, "pseudolabel": 60, "prefix": 10, "test": 30}


rule shard:
    input:
        unpack(shard_inputs),
    output:
        directory(f"{RUN}/shards/{{split}}"),
    wildcard_constraints:
        split="|".join(SHARD_RUNTIME),
    params:
        p=shard_params,
        kept=shard_kept_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/shard/{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/shard-{{split}}.tsv",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards: SHARD_RUNTIME[wildcards.split],
    shell:
        "dalipipe shard --params {params.p:q} --extract {input.extract:q}"
        " --metadata {input.metadata:q} {params.kept} --split {wildcards.split} --out {output:q}"
        " > {log} 2>&1"
