# The caption filter (paper App. C): caption each extract part's frames and score every clip
# against its sound labels (one job per part, GPU when present), then keep the closest clips.
#   snakemake --cores 2 results/miniature/filter/kept.txt
# filter.captioner may contain {run}; a captioner under results/ (the miniature's bootstrap
# LLaVA) becomes an input, a hub id (Salesforce/blip2-opt-2.7b) does not.

FILTER_CAPTIONER = FILTER.get("captioner", "Salesforce/blip2-opt-2.7b").format(run=config["run"])


rule filter_part:
    input:
        extract=f"{RUN}/extract/part-{{i}}",
        metadata=f"{RUN}/acquire/metadata.jsonl",
        captioner=[FILTER_CAPTIONER] if FILTER_CAPTIONER.startswith("results/") else [],
        hub=hub_markers("filter.captioner", "filter.gpt2"),  # cache markers, where fetched
        exclude=EXCLUDE_ID_LISTS,
    output:
        directory(f"{RUN}/filter/part-{{i}}"),
    wildcard_constraints:
        i=r"\d+",
    params:
        # less `keep`, which only the merge reads: a new `keep` does not recaption every frame
        p=job_params("filter", "-filter.keep"),
        captioner=lambda wildcards, input: input.captioner or FILTER_CAPTIONER,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/filter/part-{{i}}.log",
    benchmark:
        f"{BENCHMARKS}/filter_part-{{i}}.tsv",
    threads: 1  # parts side by side on 2 cores, each with its decode worker
    resources:
        mem_mb=32000,
        runtime=720,  # paper scale: ~20M frames at ~500 frames/s on one H200, split in parts
        gpu=1,
    shell:
        "dalipipe filter --params {params.p:q} --extract {input.extract:q}"
        " --metadata {input.metadata:q} --captioner {params.captioner:q}"
        " --out {output:q} > {log} 2>&1"


rule filter_merge:
    input:
        expand(f"{RUN}/filter/part-{{i}}", i=PARTS),
    output:
        kept=f"{RUN}/filter/kept.txt",
        distances=f"{RUN}/filter/distances.csv",
        histogram=report(f"{RUN}/filter/histogram.png", category="Data"),
        summary=f"{RUN}/filter/summary.json",
    params:
        p=job_params("filter"),
        out=parent_of("kept"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/filter/merge.log",
    benchmark:
        f"{BENCHMARKS}/filter_merge.tsv",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "dalipipe filter-merge --params {params.p:q} --parts {input:q}"
        " --out {params.out:q} > {log} 2>&1"
