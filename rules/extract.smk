# Extraction: frames (first frame of each second), 16 kHz mono WAV and the filterbank input of
# every acquired clip; one job per acquire part, so part i starts as soon as it is acquired.
#   snakemake --cores 2 results/miniature/extract/part-0
# Works for every acquire source: the part directory holds manifest.csv with the clip paths.

rule extract_part:
    input:
        f"{RUN}/acquire/part-{{i}}",
    output:
        directory(f"{RUN}/extract/part-{{i}}"),
    wildcard_constraints:
        i=r"\d+",
    params:
        # less keep_wav, which only the shard stage reads
        p=job_params("extract", "-extract.keep_wav"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/extract/part-{{i}}.log",
    benchmark:
        f"{BENCHMARKS}/extract_part-{{i}}.tsv",
    threads: 2  # ffmpeg decodes one clip while Python computes the last one's filterbank
    resources:
        mem_mb=2000,
        runtime=720,  # paper scale: ~250k clips of 10 s per part
    shell:
        "dalipipe extract {input:q}/manifest.csv --out {output:q} --params {params.p:q}"
        " --workers {threads} > {log} 2>&1"
