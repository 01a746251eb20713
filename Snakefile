# dalipipe: DALI ("An Eye for an Ear") as a Snakemake workflow.
#   snakemake --cores 2            the miniature run of config.yaml -> results/miniature/
#   snakemake --profile slurm      a Slurm cluster at paper scale (slurm/, configs/paper.yaml)
#   snakemake --report report.html the HTML report of a finished run
# Each rule calls one `dalipipe` command; nothing of substance lives in the rule files.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/acquire.smk"
include: "rules/audioset.smk"
include: "rules/extract.smk"
include: "rules/filter.smk"
include: "rules/shard.smk"
include: "rules/bootstrap.smk"
include: "rules/align.smk"
include: "rules/caption.smk"
include: "rules/evaluate.smk"
include: "rules/figures.smk"
include: "rules/experiments.smk"
include: "rules/fetch.smk"


rule all:
    input:
        f"{RUN}/table.csv",
        f"{RUN}/report/classes.md" if CLASS_BREAKDOWN else [],
    default_target: True
