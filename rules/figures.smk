# The paper's Table 2 (image-bias probe), Figure 6 (one clip's tokens, PCA) and Figure 7 (the
# attentive scorer's token weights), each a target shown in the report:
#   snakemake --cores 2 results/miniature/report/probe.html results/miniature/report/pca_clip.png
#   snakemake --cores 2 results/miniature/report/attention.png
# FIGURE_TARGETS lists them. They read the first evaluated set with video frames (the
# miniature's test shards, or AudioCaps at paper scale); without one only Table 2 is made, from
# the first set. The commands live in dalipipe/paper/probe.py and figures.py.

FIGURE_DATASET = next((d for d in EVAL_DATASETS if d != "clotho"), None)
FIGURE_SET = FIGURE_DATASET or EVAL_DATASETS[0]  # Table 2 needs audio only
FIGURE_DATA = (
    [f"{RUN}/shards/test"]
    if FIGURE_SET == "miniature"
    else [EVAL["datasets"][FIGURE_SET][k] for k in ("csv", "media")]
)
FIGURE_SHARDS = f"--shards {RUN}/shards/test" if FIGURE_SET == "miniature" else ""
# what every figure job reads of the config, besides its own evaluate.figures setting
FIGURE_SETTINGS = (
    f"evaluate.datasets.{FIGURE_SET}",
    "evaluate.frame",
    "evaluate.seed",
    "extract.fbank",
    "extract.frame_short_side",
    "extract.frame_crop",
    *CAPTIONER_SETTINGS,
)
FIGURE_TARGETS = [f"{RUN}/report/probe.html"]
if FIGURE_DATASET:
    FIGURE_TARGETS.append(f"{RUN}/report/pca_clip.png")
    if "ot_att" in EVAL_METHODS:
        FIGURE_TARGETS.append(f"{RUN}/report/attention.png")


rule probe:
    input:
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
        align=expand(f"{RUN}/align/{{m}}", m=EVAL_METHODS),
        data=FIGURE_DATA,
    output:
        page=report(
            f"{RUN}/report/probe.html", caption="../report/probe.rst", category="Image bias"
        ),
        table=f"{RUN}/report/probe.csv",
        markdown=f"{RUN}/report/probe.md",
        record=f"{RUN}/report/probe.json",
    params:
        p=job_params(
            *FIGURE_SETTINGS,
            "evaluate.figures.probe_prompt",
            "evaluate.figures.probe_clips",
            "evaluate.max_new_tokens",
            "evaluate.batch_size",
        ),
        captioner=captioner_arg,
        dataset=FIGURE_SET,
        shards=FIGURE_SHARDS,
        stem=lambda wc, output: os.path.splitext(output.page)[0],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/probe.log",
    threads: 2
    resources:
        mem_mb=32000,
        runtime=60,
        gpu=1,
    shell:
        "dalipipe probe --params {params.p:q} --dataset {params.dataset} {params.shards}"
        " --captioner {params.captioner:q} --align {input.align:q} --out {params.stem:q}"
        " > {log} 2>&1"


rule pca_clip:
    input:
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
        align=expand(f"{RUN}/align/{{m}}", m=EVAL_METHODS),
        data=FIGURE_DATA,
    output:
        report(
            f"{RUN}/report/pca_clip.png", caption="../report/pca_clip.rst", category="Modality gap"
        ),
    params:
        p=job_params(*FIGURE_SETTINGS, "evaluate.figures.pca_clip"),
        captioner=captioner_arg,
        dataset=FIGURE_SET,
        shards=FIGURE_SHARDS,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/pca_clip.log",
    threads: 2
    resources:
        mem_mb=32000,
        runtime=30,
        gpu=1,
    shell:
        "dalipipe figure pca-clip --params {params.p:q} --dataset {params.dataset} {params.shards}"
        " --captioner {params.captioner:q} --align {input.align:q} --out {output:q} > {log} 2>&1"


rule attention:
    input:
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
        align=f"{RUN}/align/ot_att",
        data=FIGURE_DATA,
    output:
        report(
            f"{RUN}/report/attention.png", caption="../report/attention.rst", category="Attention"
        ),
    params:
        p=job_params(*FIGURE_SETTINGS, "evaluate.figures.attention_clips"),
        captioner=captioner_arg,
        dataset=FIGURE_SET,
        shards=FIGURE_SHARDS,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/attention.log",
    threads: 2
    resources:
        mem_mb=32000,
        runtime=30,
        gpu=1,
    shell:
        "dalipipe figure attention --params {params.p:q} --dataset {params.dataset} {params.shards}"
        " --captioner {params.captioner:q} --align {input.align:q} --out {output:q} > {log} 2>&1"
