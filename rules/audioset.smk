# AudioSet acquisition, used when acquire.source is "audioset": select segments, download each
# part with yt-dlp (one job per part); rule acquire_gather gathers the parts.
#   snakemake --cores 4 results/<run>/acquire/manifest.csv
# Downloads are resumable: finished clips stay in acquire/part-<i>.work/ (outside the declared
# output), so a failed or re-run job fetches only what is missing. See dalipipe/data/download.py.

AUDIOSET_SPLITS = (
    [AUDIOSET.get("split")] if isinstance(AUDIOSET.get("split"), str) else AUDIOSET.get("split", [])
)


if config["acquire"]["source"] == "audioset":

    rule audioset_select:
        input:
            segments=[AUDIOSET["segments"][s] for s in AUDIOSET_SPLITS],
            class_index=AUDIOSET["class_index"],
            ontology=[AUDIOSET["ontology"]] if AUDIOSET.get("ontology") else [],
            exclude=EXCLUDE_ID_LISTS,
            subset=[AUDIOSET["subset"]] if AUDIOSET.get("subset") else [],
        output:
            parts=expand(f"{RUN}/acquire/selection/part-{{i}}.jsonl", i=PARTS),
            summary=f"{RUN}/acquire/selection/summary.json",
        params:
            p=job_params("acquire.parts", "acquire.audioset", "filter.exclude_id_lists"),
            out=parent_of("summary"),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/audioset_select.log",
        threads: 1
        resources:
            mem_mb=8000,  # the unbalanced CSV has ~2M rows
            runtime=30,
        shell:
            "dalipipe audioset-select --params {params.p:q} --out {params.out:q} > {log} 2>&1"

    rule audioset_download:
        input:
            selection=f"{RUN}/acquire/selection/part-{{i}}.jsonl",
            cookies=[AUDIOSET["cookies"]] if AUDIOSET.get("cookies") else [],
        output:
            directory(f"{RUN}/acquire/part-{{i}}"),
        wildcard_constraints:
            i=r"\d+",
        params:
            # the selection is what it downloads: the subset that made it is not its setting
            p=job_params("acquire.parts", "acquire.audioset", "-acquire.audioset.subset"),
            selection=f"{RUN}/acquire/selection",
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/audioset_download/part-{{i}}.log",
        threads: 1  # the network and YouTube's rate limits bound it, not the CPU
        resources:
            mem_mb=2000,
            runtime=2880,  # minutes; a restart resumes, so a pre-empted job loses little
        shell:
            "dalipipe acquire-audioset --params {params.p:q} --selection {params.selection:q}"
            " --part {wildcards.i} --out {output:q} > {log} 2>&1"
