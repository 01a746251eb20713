"""What every figure of the GPU suite shares: timing, peak memory, the machine, the JSON file.

    seconds = median_seconds(step, device, repeats=3, warmup=1)
    entry = figure("align.mmd.step", {"batch": 256}, seconds, "s/step")
    path = write_result(out_dir, machine_info(device, "paper"), [entry, ...])
    result = load_result(newest_result("bench/results"))   # checked: ValueError names the field

A result file is one JSON object: ``machine`` (GPU and CPU names, versions, scale, date) and
``figures``, a list of ``{"name", "shape", "value", "unit", "baseline", "baseline_value"}``
(``baseline``: the plain-library way measured in the same run, or null), optionally ``detail``
(more numbers) and, for a figure that failed (e.g. out of memory), ``error`` with a null value.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger("bench")

FIGURE_KEYS = ("name", "shape", "value", "unit", "baseline", "baseline_value")
MACHINE_KEYS = ("gpu", "cpu", "cpu_cores", "torch", "transformers", "python", "scale", "date")
TIMESTAMP = "%Y%m%dT%H%M%SZ"  # file names start with it, so they sort by date

# LLaVA-1.5-7B's shapes for dalipipe.models.llava_config.llava_config: CLIP ViT-L/14-336 and LLaMA-7B
# (dalipipe.memory.architectures.PINNED gives each number's source), randomly initialised
PAPER_LLAVA = dict(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    text_hidden=4096,
    text_layers=32,
    text_heads=32,
    max_positions=4096,
    vocab_size=32064,
    text_intermediate=11008,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ffmpeg), user + system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def resident_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters and buffers (each storage once)."""
    seen = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def peak_bytes(run: Callable[[], object], device, resident: int) -> int:
    """Peak memory while ``run()`` executes. On a GPU ``torch.cuda.max_memory_allocated`` (all
    that is allocated, the models included); on a CPU the models' ``resident`` bytes plus the
    peak of what ``run()`` allocates, tensor by tensor (``dalipipe.memory.measure``), the same
    quantity without the kernels' scratch space."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from dalipipe.memory.measure import peak_bytes as allocated_peak

    return resident + allocated_peak(run)


def figure(name, shape, value, unit, baseline=None, baseline_value=None, **detail) -> dict:
    entry = {
        "name": name,
        "shape": shape,
        "value": float(value),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else float(baseline_value),
    }
    if detail:
        entry["detail"] = detail
    return entry


def failed(name: str, error: BaseException) -> dict:
    """The entry of a figure that could not be measured: the error instead of a value."""
    return {
        "name": name,
        "shape": None,
        "value": None,
        "unit": None,
        "baseline": None,
        "baseline_value": None,
        "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
    }


def attempt(names: list[str], measure: Callable[[], list[dict]]) -> list[dict]:
    """``measure()``'s figures; if it raises (out of memory, a missing package), one error entry
    per expected name, so one broken section never stops the suite."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - recorded in the result, the suite goes on
        log.error("%s failed:\n%s", ", ".join(names), traceback.format_exc())
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [failed(name, error) for name in names]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, scale: str) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "gpu": gpu,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "scale": scale,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def result_name(machine: dict) -> str:
    """``<UTC timestamp>-<gpu or cpu name>.json``, the name made of [A-Za-z0-9_-] only."""
    date = datetime.fromisoformat(machine["date"]).strftime(TIMESTAMP)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine["gpu"] or machine["cpu"]).strip("-")
    return f"{date}-{slug or 'unknown'}.json"


def write_result(out_dir, machine: dict, figures: list[dict]) -> Path:
    result = {"machine": machine, "figures": figures}
    check_result(result, "the suite's result")
    out = Path(out_dir) / result_name(machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    return out


def check_result(result, where) -> None:
    """ValueError naming ``where`` and the field, for a result that is not the suite's format."""
    if not isinstance(result, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(result).__name__}")
    for key in ("machine", "figures"):
        if key not in result:
            raise ValueError(f"{where}: missing field {key!r}")
    missing = [k for k in MACHINE_KEYS if k not in result["machine"]]
    if missing:
        raise ValueError(f"{where}: machine lacks {missing}")
    if not isinstance(result["figures"], list):
        raise ValueError(f"{where}: figures: expected a list")
    for i, entry in enumerate(result["figures"]):
        missing = [k for k in FIGURE_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{where}: figures[{i}] lacks {missing}")
        value = entry["value"]
        if value is None:
            if not entry.get("error"):
                raise ValueError(f"{where}: figures[{i}] ({entry['name']}): no value and no error")
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: figures[{i}] ({entry['name']}): value {value!r}")


def load_result(path) -> dict:
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    check_result(result, str(path))
    return result


def result_files(directory) -> list[Path]:
    """The suite's result files in ``directory``, oldest first (their names start with the date)."""
    return sorted(Path(directory).glob("[0-9]*T*Z-*.json"))


def newest_result(directory, scale: str | None = None) -> Path | None:
    """The newest result file, or the newest of one scale; None if there is none."""
    for path in reversed(result_files(directory)):
        if scale is None or load_result(path)["machine"]["scale"] == scale:
            return path
    return None
