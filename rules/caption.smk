# Captioning stages: prefix tuning, pseudo-labels and audiovisual distillation (one per method).
#   snakemake --cores 2 results/miniature/distill/ot_att
# The commands live in dalipipe/caption/; see DEVELOPING.md for the artifacts they write.

rule prefix:
    input:
        pairs=(config.get("prefix") or {}).get("pairs") or f"{RUN}/shards/prefix",
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
    output:
        directory(f"{RUN}/prefix"),
    params:
        p=job_params("prefix", *CAPTIONER_SETTINGS),
        captioner=captioner_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/prefix.log",
    benchmark:
        f"{BENCHMARKS}/prefix.tsv",
    priority: 100  # beside the longest alignment: every pseudo-label job waits for it
    threads: 1  # two at a time on 2 cores (README, Time); slurm/config.yaml sets cluster CPUs
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    shell:
        "dalipipe prefix --params {params.p:q} --pairs {input.pairs:q}"
        " --captioner {params.captioner:q} --out {output:q} > {log} 2>&1"


rule pseudolabel:
    input:
        pool=f"{RUN}/shards/pseudolabel",
        encoder=f"{RUN}/align/{{method}}",
        prefix=f"{RUN}/prefix",
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
    output:
        f"{RUN}/pseudolabel/{{method}}.jsonl",
    wildcard_constraints:
        method="[A-Za-z0-9_-]+",
    params:
        p=job_params("pseudolabel", *CAPTIONER_SETTINGS),
        captioner=captioner_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/pseudolabel/{{method}}.log",
    benchmark:
        f"{BENCHMARKS}/pseudolabel-{{method}}.tsv",
    threads: 1  # two at a time on 2 cores (README, Time); slurm/config.yaml sets cluster CPUs
    resources:
        mem_mb=32000,
        runtime=600,
        gpu=1,
    shell:
        "dalipipe pseudolabel --params {params.p:q} --pool {input.pool:q}"
        " --encoder {input.encoder:q} --prefix {input.prefix:q}"
        " --captioner {params.captioner:q} --out {output:q} > {log} 2>&1"


rule distill:
    input:
        pseudolabels=f"{RUN}/pseudolabel/{{method}}.jsonl",
        pool=f"{RUN}/shards/pseudolabel",
        encoder=f"{RUN}/align/{{method}}",
        prefix=f"{RUN}/prefix",
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
    output:
        directory(f"{RUN}/distill/{{method}}"),
    wildcard_constraints:
        method="[A-Za-z0-9_-]+",
    params:
        # the feature settings `dalipipe caption` needs, recorded in the captioner directory
        p=job_params(
            "distill",
            "extract.fbank",
            "extract.frame_short_side",
            "extract.frame_crop",
            "extract.window_seconds",
            *CAPTIONER_SETTINGS,
        ),
        captioner=captioner_arg,
        launch=accelerate_launcher,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/distill/{{method}}.log",
    benchmark:
        f"{BENCHMARKS}/distill-{{method}}.tsv",
    threads: 1  # two at a time on 2 cores (README, Time); slurm/config.yaml sets cluster CPUs
    resources:
        mem_mb=64000,
        runtime=480,
        gpu=1,
    shell:
        "{params.launch} distill --params {params.p:q} --pseudolabels {input.pseudolabels:q}"
        " --pool {input.pool:q} --encoder {input.encoder:q} --prefix {input.prefix:q}"
        " --captioner {params.captioner:q} --out {output:q} > {log} 2>&1"
