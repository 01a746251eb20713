# Shared by every rule file: config validation, the run directory, stage parameters.
import json
import os

from dalipipe.config import ConfigError, validate_config

try:
    validate_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

RUN = f"results/{config['run']}"


def stage_params(*sections):
    """The config sections a stage uses, as one JSON string passed to `dalipipe CMD --params`.

    Rules put this in `params:`; Snakemake reruns a rule whose params changed, so changing a
    config value reruns exactly the stages that read it, and what follows them.
    """
    payload = {"seed": config["seed"], "device": config["device"]}
    payload.update({name: config.get(name) for name in sections})
    return json.dumps(payload, sort_keys=True)


def require_existing_paths(*keys):
    """Stop before any job when a configured input path does not exist, naming the key."""
    for key in keys:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values = node if isinstance(node, list) else [node]
        for value in values:
            if value is not None and not os.path.exists(str(value)):
                raise WorkflowError(f"config key {key}: path {value!r} does not exist")
