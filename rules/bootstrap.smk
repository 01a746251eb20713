# The miniature's captioner: a small LLaVA-class model trained on the align split's frames and
# visual captions (plus text-only audio captions): the stand-in for LLaVA's pre-training.
# Used when models.captioner is "bootstrap"; paper-scale runs use a hub LLaVA instead.
#   snakemake --cores 2 results/miniature/models/llava
# It reads the extract output, not shards/align: the caption filter that shards/align waits
# for uses this captioner. See dalipipe/caption/bootstrap.py.

rule bootstrap:
    input:
        extract=expand(f"{RUN}/extract/part-{{i}}", i=PARTS),
        metadata=f"{RUN}/acquire/metadata.jsonl",
    output:
        directory(f"{RUN}/models/llava"),
    params:
        p=job_params("bootstrap"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/bootstrap.log",
    benchmark:
        f"{BENCHMARKS}/bootstrap.tsv",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    shell:
        "dalipipe bootstrap --params {params.p:q} --extract {input.extract:q}"
        " --metadata {input.metadata:q} --out {output:q} > {log} 2>&1"
