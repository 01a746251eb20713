# Evaluation and the report: caption each test set with every system, score it, draw the figures.
#   snakemake --cores 2 results/miniature/table.csv
#   snakemake --report report.html        (after a run: tables, examples, curves, modality gap)
# The commands live in dalipipe/evaluate/ (evaluate; its metrics in dalipipe/scoring/),
# dalipipe/paper/report.py and dalipipe/world/class_breakdown.py; see DEVELOPING.md for the
# artifacts they read.

# trained-captioner directories evaluated beside the run's own (e.g. `dalipipe import-authors`)
EVAL_EXTRA_SYSTEMS = EVAL.get("extra_systems") or {}
# FENSE's models where configured (rules/fetch.smk fetches them); none: FENSE is null
EVAL_FENSE_MODELS = [p for p in (EVAL.get("fense") or {}).values() if p]
# the folder of Stanford CoreNLP's jars SPICE runs with, where configured (rules/fetch.smk)
EVAL_CORENLP = [EVAL["corenlp"]] if EVAL.get("spice", True) and EVAL.get("corenlp") else []


rule evaluate:
    input:
        unpack(evaluate_inputs),
        extra=list(EVAL_EXTRA_SYSTEMS.values()),
        fense=EVAL_FENSE_MODELS,
        corenlp=EVAL_CORENLP,
    output:
        directory(f"{RUN}/evaluate/{{dataset}}"),
    wildcard_constraints:
        dataset="miniature|audiocaps|clotho",
    params:
        # this dataset's settings only, less what only the report reads; the stage takes
        # evaluate.extra_systems (name -> directory, the `extra` inputs) from here
        p=job_params(
            "evaluate",
            "-evaluate.examples",
            "-evaluate.figures",
            "-evaluate.datasets",
            "evaluate.datasets.{dataset}",
            "extract.fbank",
            "extract.frame_short_side",
            "extract.frame_crop",
            *CAPTIONER_SETTINGS,
        ),
        shards=lambda wc: f"--shards {RUN}/shards/test" if wc.dataset == "miniature" else "",
        captioner=captioner_arg,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/evaluate/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate-{{dataset}}.tsv",
    threads: 2
    resources:
        mem_mb=32000,
        runtime=360,
        gpu=1,
    shell:
        "dalipipe evaluate --params {params.p:q} --dataset {wildcards.dataset} {params.shards}"
        " --captioner {params.captioner:q} --prefix {input.prefix:q}"
        " --align {input.align:q} --distill {input.distill:q} --out {output:q} > {log} 2>&1"


EVAL_FIGURES = {}
if any(name != "clotho" for name in EVAL_DATASETS):  # the PCA needs image tokens
    EVAL_FIGURES["gap"] = report(
        f"{RUN}/report/modality_gap.png",
        caption="../report/modality_gap.rst",
        category="Modality gap",
    )


rule report_figures:
    input:
        evaluate=expand(f"{RUN}/evaluate/{{d}}", d=EVAL_DATASETS),
        curves=report_curves,
        manifest=f"{RUN}/acquire/manifest.csv" if "miniature" in EVAL_DATASETS else [],
    output:
        table=report(f"{RUN}/table.csv", caption="../report/table.rst", category="Results"),
        table_md=f"{RUN}/table.md",
        results=report(
            f"{RUN}/report/results.html", caption="../report/results.rst", category="Results"
        ),
        examples=report(
            f"{RUN}/report/examples.html", caption="../report/examples.rst", category="Examples"
        ),
        curves=report(
            f"{RUN}/report/curves.png", caption="../report/curves.rst", category="Training"
        ),
        **EVAL_FIGURES,
    params:
        p=job_params("evaluate", "-evaluate.figures", "extract.fbank"),
        curves=lambda wc, input: " ".join(f"{d}/curve.csv" for d in input.curves),
        examples=EVAL.get("examples", 6),
        shards=f"--shards {RUN}/shards/test" if "miniature" in EVAL_DATASETS else "",
        manifest=lambda wc, input: f"--acquire {input.manifest}" if input.manifest else "",
        out=parent_of("results"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/report_figures.log",
    benchmark:
        f"{BENCHMARKS}/report_figures.tsv",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dalipipe report --params {params.p:q} --evaluate {input.evaluate:q} --curves {params.curves}"
        " --examples {params.examples} {params.shards} {params.manifest}"
        " --out {params.out:q} --table-csv {output.table:q} --table-md {output.table_md:q}"
        " > {log} 2>&1"


# The synthetic world knows which classes each clip makes heard: class recall per class, and the
# pseudo-labels scored on their own pool (the miniature's analysis in the README).
CLASS_BREAKDOWN = (
    "miniature" in EVAL_DATASETS
    and (config.get("acquire") or {}).get("source", "synthetic") == "synthetic"
)
if CLASS_BREAKDOWN:

    rule class_breakdown:
        input:
            evaluate=f"{RUN}/evaluate/miniature",
            metadata=f"{RUN}/acquire/metadata.jsonl",
            pseudolabels=expand(f"{RUN}/pseudolabel/{{m}}.jsonl", m=EVAL_DISTILLED),
        output:
            report(
                f"{RUN}/report/classes.md",
                caption="../report/classes.rst",
                category="Results",
            ),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/class_breakdown.log",
        benchmark:
            f"{BENCHMARKS}/class_breakdown.tsv",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "dalipipe class-breakdown --metadata {input.metadata:q} --evaluate {input.evaluate:q}"
            " --pseudolabels {input.pseudolabels:q} --out {output:q} > {log} 2>&1"
