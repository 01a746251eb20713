# Stage 1b, alignment: one audio encoder per method of config `align.methods`.
#   snakemake --cores 2 results/miniature/align/ot_att
# The command lives in dalipipe/align/train.py. A killed or pre-empted job leaves its checkpoint
# in results/<run>/align/<method>.ckpt/ and resumes from it when rerun.
import os
import re


def align_captioner():
    """config `models.captioner`: "bootstrap" (the miniature's own), a directory, or a hub id."""
    name = (config.get("models") or {}).get("captioner", "bootstrap")
    return f"{RUN}/models/llava" if name == "bootstrap" else str(name)


def align_inputs(wildcards):
    inputs = {"shards": f"{RUN}/shards/align", "val": f"{RUN}/shards/test"}
    captioner = align_captioner()
    if captioner.startswith(RUN) or os.path.exists(captioner):  # a hub id is not a file input
        inputs["captioner"] = captioner
    return inputs


def align_launcher(wildcards, resources):
    """One process per GPU through accelerate when the job holds several GPUs."""
    gpus = getattr(resources, "gpu", None) or getattr(resources, "gres", None) or 0
    count = int(re.findall(r"\d+", str(gpus))[-1]) if re.search(r"\d", str(gpus)) else 0
    if count > 1:
        return f"accelerate launch --multi_gpu --num_processes {count} -m dalipipe.cli"
    return "dalipipe"


rule align:
    input:
        unpack(align_inputs),
    output:
        directory(f"{RUN}/align/{{method}}"),
    wildcard_constraints:
        method="|".join(config.get("align", {}).get("methods") or ["mmd", "ot", "ot_att", "contrastive"]),
    params:
        p=stage_params("align", "models"),
        captioner=align_captioner(),
        launch=align_launcher,
    log:
        "logs/align/{method}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "{params.launch} align --params {params.p:q} --method {wildcards.method}"
        " --shards {input.shards:q} --val-shards {input.val:q}"
        " --captioner {params.captioner:q} --out {output:q} --threads {threads} > {log} 2>&1"
