# Stage 1b, alignment: one audio encoder per method of config `align.methods`.
#   snakemake --cores 2 results/miniature/align/ot_att
# The command lives in dalipipe/align/train.py. A killed or pre-empted job leaves its checkpoint
# in results/<run>/align/<method>.ckpt/ and resumes from it when rerun.


rule align:
    input:
        unpack(align_inputs),
    output:
        directory(f"{RUN}/align/{{method}}"),
    wildcard_constraints:
        method="|".join(config.get("align", {}).get("methods") or ["mmd", "ot", "ot_att", "contrastive"]),
    params:
        # this method's settings only: editing another method's reruns nothing here
        p=job_params(
            "align",
            "-align.methods",
            "-align.per_method",
            "align.per_method.{method}",
            "models.audio_encoder",
            *CAPTIONER_SETTINGS,
        ),
        captioner=captioner_arg,
        launch=accelerate_launcher,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/align/{{method}}.log",
    benchmark:
        f"{BENCHMARKS}/align-{{method}}.tsv",
    priority: align_epochs
    threads: 1  # two at a time on 2 cores (README, Time); slurm/config.yaml sets cluster CPUs
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "{params.launch} align --params {params.p:q} --method {wildcards.method}"
        " --shards {input.shards:q} --val-shards {input.val:q}"
        " --captioner {params.captioner:q} --out {output:q} --threads {threads} > {log} 2>&1"
