# The paper's experiments beyond the main table, and `paper_figures`, the target of them all:
#   snakemake --cores 2 paper_figures      every table and figure of the paper, in the report
#   snakemake --cores 2 results/miniature/report/prefix_pairs.png   Appendix A / Figure 5
#   snakemake --cores 2 results/miniature/report/seeds.md           the table across seeds
# Settings: config `experiments` (dalipipe/resources/config.schema.yaml). The commands live in
# dalipipe/paper/experiments.py.
import sys

from dalipipe.paper.experiments import override_params

EXPERIMENTS = config.get("experiments") or {}

# Appendix A / Figure 5: the prefix trained on the first n pairs of one seeded shuffle (nested
# subsets, dalipipe.caption.pairs.first_pairs), then the image-only system and one aligned
# encoder's zero-shot captions scored with that prefix on the first evaluated set.
PREFIX_PAIRS = EXPERIMENTS.get("prefix_pairs") or []
SWEEP_DIR = f"{RUN}/experiments/prefix_pairs"
SWEEP_DATASET = EVAL_DATASETS[0]
# null: the paper's best method when this run aligns it, else the first evaluated one
SWEEP_METHOD = EXPERIMENTS.get("prefix_sweep_method") or (
    "ot_att" if "ot_att" in EVAL_METHODS else (EVAL_METHODS or [None])[0]
)
SWEEP_SYSTEMS = EXPERIMENTS.get("prefix_sweep_systems") or ["image", "audio"]
SWEEP_ALIGN = [f"{RUN}/align/{SWEEP_METHOD}"] if set(SWEEP_SYSTEMS) - {"image"} else []
if PREFIX_PAIRS and SWEEP_ALIGN and SWEEP_METHOD not in EVAL_METHODS:  # set, and not evaluated
    raise WorkflowError(
        f"config key experiments.prefix_sweep_method: {SWEEP_METHOD!r} is not one of the "
        f"evaluated methods {EVAL_METHODS} (evaluate.methods)"
    )

# Seeds: the whole run once per seed, each in its own run directory results/<run>-seed<k>/ by
# a nested snakemake on this run's config with `seed` and `run` replaced. This run's own seed
# is this run's table: it is not made twice.
SEEDS = EXPERIMENTS.get("seeds") or []
SEED_TABLES = [
    f"{RUN}/table.csv" if seed == config["seed"] else f"{RUN}/experiments/seeds/seed{seed}.csv"
    for seed in SEEDS
]


rule prefix_sweep:
    input:
        pairs=sweep_pairs,
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
    output:
        directory(f"{SWEEP_DIR}/{{n}}/prefix"),
    wildcard_constraints:
        n=r"\d+",
    params:
        p=lambda wc: override_params(
            job_params("prefix", *CAPTIONER_SETTINGS)(wc), {"n_pairs": int(wc.n)}
        ),
        captioner=captioner_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/experiments/prefix_pairs/{{n}}/prefix.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    shell:
        "dalipipe prefix --params {params.p:q} --pairs {input.pairs:q}"
        " --captioner {params.captioner:q} --out {output:q} > {log} 2>&1"


rule prefix_sweep_evaluate:
    input:
        captioner=CAPTIONER_INPUT,
        hub=HUB_CAPTIONER,  # the hub model's cache marker, where fetched
        prefix=f"{SWEEP_DIR}/{{n}}/prefix",
        align=SWEEP_ALIGN,
        data=(
            [f"{RUN}/shards/test"]
            if SWEEP_DATASET == "miniature"
            else [EVAL["datasets"][SWEEP_DATASET][k] for k in ("csv", "media")]
        ),
        corenlp=EVAL_CORENLP,  # SPICE's jars, where configured (the ordering metric is SPIDEr)
    output:
        directory(f"{SWEEP_DIR}/{{n}}/evaluate"),
    wildcard_constraints:
        n=r"\d+",
    params:
        # the run's evaluation settings, on the sweep's systems only
        p=lambda wc: override_params(
            job_params(
                "evaluate",
                "-evaluate.examples",
                "-evaluate.figures",
                "-evaluate.datasets",
                f"evaluate.datasets.{SWEEP_DATASET}",
                "extract.fbank",
                *CAPTIONER_SETTINGS,
            )(wc),
            {"evaluate.systems": SWEEP_SYSTEMS, "evaluate.extra_systems": {}},
        ),
        shards=f"--shards {RUN}/shards/test" if SWEEP_DATASET == "miniature" else "",
        align=lambda wc, input: f"--align {input.align}" if input.align else "",
        captioner=captioner_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/experiments/prefix_pairs/{{n}}/evaluate.log",
    threads: 2
    resources:
        mem_mb=32000,
        runtime=360,
        gpu=1,
    shell:
        "dalipipe evaluate --params {params.p:q} --dataset "
        + SWEEP_DATASET
        + " {params.shards} --captioner {params.captioner:q} --prefix {input.prefix:q}"
        " {params.align} --out {output:q} > {log} 2>&1"


rule prefix_sweep_report:
    input:
        expand(f"{SWEEP_DIR}/{{n}}/evaluate", n=PREFIX_PAIRS),
    output:
        csv=report(
            f"{RUN}/experiments/prefix_pairs.csv",
            caption="../report/prefix_pairs.rst",
            category="Experiments",
        ),
        png=report(
            f"{RUN}/report/prefix_pairs.png",
            caption="../report/prefix_pairs.rst",
            category="Experiments",
        ),
    params:
        pairs=" ".join(map(str, PREFIX_PAIRS)),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/experiments/prefix_pairs.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "dalipipe experiments sweep --pairs {params.pairs} --evaluate {input:q}"
        " --out-csv {output.csv:q} --out-png {output.png:q} > {log} 2>&1"


rule seed_run:
    output:
        f"{RUN}/experiments/seeds/seed{{seed}}.csv",
    wildcard_constraints:
        seed=r"\d+",
    params:
        # this run's whole config (defaults filled), laid over config.yaml by the nested run
        config=lambda wc: json.dumps(config, sort_keys=True),
        configfile=lambda wc: f"{RUN}/experiments/seeds/seed{wc.seed}.config.json",
        run=lambda wc: f"{config['run']}-seed{wc.seed}",
        # the snakemake running this workflow runs the nested one
        snakemake=f"{sys.executable} -m snakemake",
        snakefile=workflow.main_snakefile,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/experiments/seed{{seed}}.log",
    localrule: True
    # the nested run schedules its own jobs on every core this one was given; a cluster profile
    # gives --jobs, not --cores (workflow.cores would raise), and then it runs on one
    threads: workflow.global_resources["_cores"].value or 1
    shell:
        "printf '%s' {params.config:q} > {params.configfile:q} && {params.snakemake}"
        " --snakefile {params.snakefile:q} --cores {threads} --nolock"
        " --configfile {params.configfile:q} --config seed={wildcards.seed} run={params.run}"
        " -- results/{params.run}/table.csv > {log} 2>&1"
        " && cp results/{params.run}/table.csv {output:q}"


rule seeds_report:
    input:
        tables=SEED_TABLES,
    output:
        csv=f"{RUN}/experiments/seeds.csv",
        md=report(f"{RUN}/report/seeds.md", caption="../report/seeds.rst", category="Experiments"),
    params:
        seeds=" ".join(map(str, SEEDS)),
        metric=EXPERIMENTS.get("ordering_metric", "cider_d"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/experiments/seeds.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "dalipipe experiments seeds --seeds {params.seeds} --tables {input.tables:q}"
        " --metric {params.metric} --out-csv {output.csv:q} --out-md {output.md:q} > {log} 2>&1"


# Every item of the paper: Tables 1/3 (the run's table, with the published values beside where
# the sets are the paper's), Table 2 and Figures 4, 6, 7 (rules/figures.smk, included before
# this file), Appendix A / Figure 5 and the seeds, each shown in `snakemake --report`.
rule paper_figures:
    input:
        f"{RUN}/table.csv",
        f"{RUN}/report/classes.md" if CLASS_BREAKDOWN else [],
        FIGURE_TARGETS if "FIGURE_TARGETS" in globals() else [],
        f"{RUN}/report/prefix_pairs.png" if PREFIX_PAIRS else [],
        f"{RUN}/report/seeds.md" if SEEDS else [],
