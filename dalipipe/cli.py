"""The ``dalipipe`` command: one sub-command per stage or tool.

    dalipipe --help                        # the commands for people first, then the stages
    dalipipe caption clip.mp4 --model DIR

Each sub-command lives in its own module, which exposes ``main(argv: list[str]) -> int``;
modules are imported only when their command runs, so a missing optional dependency of one
stage never breaks another.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "acquire-synthetic": (
        "dalipipe.world.synthetic",
        "generate the synthetic audiovisual world (MP4 clips)",
    ),
    "acquire-local": ("dalipipe.data.local", "list a folder or CSV of local media files as clips"),
    "acquire-audioset": (
        "dalipipe.data.download",
        "download AudioSet segments with yt-dlp (one part)",
    ),
    "gather-manifests": ("dalipipe.data.gather", "merge per-part manifests and count statuses"),
    "audioset-select": (
        "dalipipe.data.audioset",
        "select AudioSet segments by split, class and count",
    ),
    "extract": ("dalipipe.data.extract", "frames, 16 kHz WAV and filterbank for each clip"),
    "features": ("dalipipe.data.fbank", "raw or normalised Kaldi filterbank of one media file"),
    "filter": (
        "dalipipe.data.filter",
        "caption frames and score clips against their labels (one part)",
    ),
    "filter-merge": (
        "dalipipe.data.filter_merge",
        "merge filter parts and keep the best-matching clips",
    ),
    "shard": ("dalipipe.data.shard", "write webdataset shards of extracted clips"),
    # The one way into dalipipe.testing from the package: imported only when a person runs
    # make-tiny (tests, benchmarks, the rehearsal), never by a stage.
    "make-tiny": (
        "dalipipe.testing.checkpoints",
        "write tiny LLaVA, BLIP-2, GPT-2 and CAV-MAE checkpoints",
    ),
    "bootstrap": (
        "dalipipe.caption.bootstrap",
        "train the miniature LLaVA-class captioner on frames",
    ),
    "prefix": (
        "dalipipe.caption.prefix",
        "learn the prefix tokens on (frame, audio caption) pairs",
    ),
    "align": (
        "dalipipe.align.train",
        "train an audio encoder to match the image-token distribution",
    ),
    "pseudolabel": (
        "dalipipe.caption.pseudolabel",
        "caption the pseudo-label pool from audio+image",
    ),
    "distill": ("dalipipe.caption.distill", "fine-tune the audio projector on the pseudo-labels"),
    "caption": ("dalipipe.describe.caption", "describe the sound of audio or video files"),
    "export": (
        "dalipipe.describe.export",
        "a trained captioner as a self-contained folder with a model card, for the Hub",
    ),
    "serve": (
        "dalipipe.describe.serve",
        "a local web page that captions a dropped or recorded sound",
    ),
    "import-authors": (
        "dalipipe.describe.import_authors",
        "the authors' released DALI weights as a trained-captioner directory",
    ),
    "evaluate": ("dalipipe.evaluate.run", "caption the test sets and score every system"),
    "score": ("dalipipe.scoring.metrics", "caption metrics for predictions against references"),
    "check-config": ("dalipipe.config", "check presets as the workflow does, before any job"),
    "plan-memory": ("dalipipe.memory.plan", "estimated peak GPU memory of every GPU stage"),
    "fetch-metric-assets": (
        "dalipipe.scoring.assets",
        "download the Stanford CoreNLP jars SPICE needs",
    ),
    "fetch": ("dalipipe.data.fetch", "download a file: resumable, checksum-verified"),
    "fetch-hf": (
        "dalipipe.data.hf_cache",
        "fill the Hugging Face cache with a model at its pinned revision",
    ),
    "paper-inputs": (
        "dalipipe.data.paper_inputs",
        "AudioCaps/prefix clip selections, prefix pairs, archive unpacking (rules/fetch.smk)",
    ),
    "report": ("dalipipe.paper.report", "figures and tables for the Snakemake report"),
    "experiments": (
        "dalipipe.paper.experiments",
        "Appendix A's prefix-pairs sweep (sweep) and the table across seeds (seeds)",
    ),
    "probe": (
        "dalipipe.paper.probe",
        "Table 2: ask the captioner what it sees in each encoder's audio tokens",
    ),
    "figure": (
        "dalipipe.paper.figures",
        "Figure 6 (pca-clip: one clip's tokens) or 7 (attention: ot_att's token weights)",
    ),
    "class-breakdown": (
        "dalipipe.world.class_breakdown",
        "per-class recall of every system of a synthetic-world run",
    ),
}


# The commands a person types; every other command is a stage or helper that the workflow's
# rules call with their `--params`, listed apart so the first screen of help stays short.
FOR_PEOPLE = (
    "caption",
    "serve",
    "export",
    "score",
    "import-authors",
    "check-config",
    "plan-memory",
    "make-tiny",
    "features",
    "fetch-hf",
    "fetch-metric-assets",
)


def _usage() -> str:
    width = max(map(len, COMMANDS))

    def listed(names):
        return [f"  {name.ljust(width)}  {COMMANDS[name][1]}" for name in names]

    stages = [name for name in COMMANDS if name not in FOR_PEOPLE]
    lines = ["usage: dalipipe COMMAND [ARGS...]    (dalipipe COMMAND --help: its arguments)", ""]
    lines += ["commands:", *listed(name for name in FOR_PEOPLE if name in COMMANDS), ""]
    lines += ["workflow stages and helpers (what the rules call; snakemake runs them):"]
    lines += listed(stages)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        from dalipipe import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dalipipe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
