# dalipipe: DALI ("An Eye for an Ear") as a Snakemake workflow.
#   snakemake --cores 2            the miniature run of config.yaml
#   snakemake --profile slurm      a Slurm cluster (see slurm/ and configs/paper.yaml)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
