# Captioning stages: prefix tuning, pseudo-labels and audiovisual distillation (one per method).
#   snakemake --cores 2 results/miniature/distill/ot_att
# The commands live in dalipipe/caption/; see DEVELOPING.md for the artifacts they write.

import os
import re


def caption_captioner():
    """config `models.captioner`: "bootstrap" (the miniature's own), a directory, or a hub id."""
    name = (config.get("models") or {}).get("captioner", "bootstrap")
    return f"{RUN}/models/llava" if name == "bootstrap" else str(name)


CAPTIONER = caption_captioner()
# a hub id is no file input: the job reads it from the Hugging Face cache
CAPTIONER_INPUT = (
    [CAPTIONER] if CAPTIONER.startswith(RUN) or os.path.exists(CAPTIONER) else []
)


def caption_launcher(wildcards, resources):
    """One process per GPU through accelerate when the distill job holds several GPUs."""
    gpus = str(getattr(resources, "gpu", None) or getattr(resources, "gres", None) or 0)
    count = int(re.findall(r"\d+", gpus)[-1]) if re.search(r"\d", gpus) else 0
    if count > 1:
        return f"accelerate launch --num_processes {count} -m dalipipe.cli"
    return "dalipipe"


rule prefix:
    input:
        pairs=(config.get("prefix") or {}).get("pairs") or f"{RUN}/shards/prefix",
        captioner=CAPTIONER_INPUT,
    output:
        directory(f"{RUN}/prefix"),
    params:
        p=stage_params("prefix", "models"),
        captioner=CAPTIONER,
    log:
        "logs/prefix.log",
    threads: 2
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
    output:
        f"{RUN}/pseudolabel/{{method}}.jsonl",
    wildcard_constraints:
        method="[A-Za-z0-9_-]+",
    params:
        p=stage_params("pseudolabel", "models"),
        captioner=CAPTIONER,
    log:
        "logs/pseudolabel/{method}.log",
    threads: 2
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
    output:
        directory(f"{RUN}/distill/{{method}}"),
    wildcard_constraints:
        method="[A-Za-z0-9_-]+",
    params:
        p=stage_params("distill", "extract", "models"),
        captioner=CAPTIONER,
        launch=caption_launcher,
    log:
        "logs/distill/{method}.log",
    threads: 2
    resources:
        mem_mb=64000,
        runtime=480,
        gpu=1,
    shell:
        "{params.launch} distill --params {params.p:q} --pseudolabels {input.pseudolabels:q}"
        " --pool {input.pool:q} --encoder {input.encoder:q} --prefix {input.prefix:q}"
        " --captioner {params.captioner:q} --out {output:q} > {log} 2>&1"
