"""Predict: classify new sentences or images with a finished run of any exercise.

    python predict.py runs/rt "a gripping, funny film" "dull and far too long"   # sentences
    python predict.py runs/rt reviews.txt --output predicted.csv                 # one text per line
    python predict.py runs/rt reviews.csv --text-column review                   # a column of a CSV/TSV
    python predict.py runs/clip photos/ cat.jpg                                  # images, folders (exercise 3)

results.json in the run folder says which exercise made it, and each loads what its run saved:
exercise 1 the fitted classifier (`classifiers/<stage>.skops`, never pickle) and the frozen encoder,
pooling and max_length it was fitted on; exercise 2 its best checkpoint (with LoRA, `adapter/` on the
base model); exercise 3 CLIP with the run's adapter (`adapter/`, or `model/` when every weight was
trained), class names and prompts. The score is the predicted class's probability (an SVC's margin).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

import devices
import images
import utils
from utils import LabError

TEXT_FILES = (".txt", ".csv", ".tsv")
STAGES = {"exercise_1": ("svc", "logreg"), "exercise_2": ("fine_tuned",),
          "exercise_3": ("lora", "fine_tuned", "zero_shot")}
SCORES = {"svc": "SVC margin (distance from the boundary; larger = surer)", "logreg": "probability",
          "fine_tuned": "probability", "lora": "probability", "zero_shot": "probability"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 through utils.run_cli, not argparse's usage dump
        raise LabError(f"{message} (python predict.py --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="python predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder (the one with results.json)")
    parser.add_argument("inputs", nargs="+", help="sentences, .txt files (one text per line), .csv/.tsv files "
                        "(--text-column), '-' (lines from stdin); for exercise 3, image files or folders")
    parser.add_argument("--text-column", default="text", metavar="COLUMN", help="the CSV/TSV column holding the texts (default: text)")
    parser.add_argument("--output", metavar="FILE.csv", help="also write the predictions to this CSV file")
    parser.add_argument("--stage", help="exercise 1: svc or logreg (default: the one better on validation); "
                        "exercise 3: zero_shot for the model without the run's training")
    parser.add_argument("--batch-size", type=int, metavar="N", help="inputs per forward pass (default: the run's eval_batch_size)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise LabError(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


# ---------------------------------------------------------------------------------------------
# The run and the inputs
# ---------------------------------------------------------------------------------------------

def load_run(folder: str) -> tuple[Path, dict]:
    """(run folder, its results.json), or one line on why this is not a finished run."""
    from evaluate import RESULTS_FILE

    run_dir = Path(folder).expanduser()
    if not run_dir.is_dir():
        raise LabError(f"run folder {folder} does not exist" if not run_dir.exists() else f"{folder} is not a folder")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        inside = sorted(child.name for child in run_dir.iterdir() if (child / RESULTS_FILE).is_file())
        why = (f"it holds run folders ({', '.join(inside[:5])}); give one" if inside
               else "the run did not finish (or this is not a run folder)")
        raise LabError(f"{folder} has no {RESULTS_FILE}: {why}")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabError(f"cannot read {path}: {error}") from None
    exercise = results.get("exercise") if isinstance(results, dict) else None
    if exercise not in STAGES:
        raise LabError(f"{path} is from {exercise or 'no known exercise'}; predict works with runs of "
                       f"{', '.join(STAGES)}")
    return run_dir, results


def model_source(run_dir: Path, config: dict, name: str) -> str:
    """`name` as the run saw it: a relative model folder is looked up from the folder the run was started
    in (found from the run folder and the relative output_dir), when it is not found from here."""
    output_dir = Path(str(config.get("output_dir", "runs")))
    if Path(name).expanduser().exists() or Path(name).is_absolute() or output_dir.is_absolute():
        return name
    origin = run_dir.resolve().parent
    for _ in output_dir.parts:
        origin = origin.parent
    return str(origin / name) if (origin / name).exists() else name


def choose_stage(results: dict, stage: str | None) -> str:
    exercise, metrics = results["exercise"], results.get("metrics") or {}
    if exercise == "exercise_3":
        trained = "lora" if (results["config"].get("lora") or {}).get("enabled") else "fine_tuned"
        allowed = (trained, "zero_shot")
    else:
        allowed = STAGES[exercise]
    if stage is None:
        accuracy = lambda name: ((metrics.get(name) or {}).get("validation") or {}).get("accuracy") or 0.0
        return max(allowed, key=accuracy) if exercise == "exercise_1" else allowed[0]
    if stage not in allowed:
        raise LabError(f"--stage {stage}: a run of {exercise} predicts with {' or '.join(allowed)}")
    return stage


def looks_like_file(item: str) -> bool:
    return not any(c.isspace() for c in item) and Path(item).suffix.lower() in (*TEXT_FILES, *images.IMAGE_SUFFIXES)


def read_texts(inputs: list[str], text_column: str) -> list[str]:
    """Sentences as given, lines of text files, a column of CSV/TSV files, lines of stdin for `-`."""
    texts = []
    for item in inputs:
        path = Path(item).expanduser()
        if item == "-":
            texts += [line.strip() for line in sys.stdin if line.strip()]
        elif path.is_dir() or path.suffix.lower() in images.IMAGE_SUFFIXES and path.exists():
            raise LabError(f"{item} is {'a folder' if path.is_dir() else 'an image'}; this run classifies text: "
                           f"give sentences or .txt/.csv files")
        elif path.is_file():
            texts += read_text_file(path, text_column)
        elif looks_like_file(item):
            raise LabError(f"input file {item} does not exist")
        else:
            texts.append(item)
    return texts


def read_text_file(path: Path, text_column: str) -> list[str]:
    import pandas as pd

    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", encoding="utf-8")
            if text_column not in frame.columns:
                raise LabError(f"{path} has no column {text_column!r} (columns: {list(frame.columns)}); "
                               f"set --text-column")
            return frame[text_column].dropna().astype(str).tolist()
        # lines end at "\n" only: str.splitlines() would also cut at U+0085 and U+2028 inside a text
        return [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except UnicodeDecodeError as error:
        raise LabError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise LabError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def read_image_paths(inputs: list[str]) -> list[str]:
    """Image files as given, and every image below a folder (sorted)."""
    paths = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in images.IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise LabError(f"folder {item} holds no images ({', '.join(images.IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file() and path.suffix.lower() in images.IMAGE_SUFFIXES:
            paths.append(str(path))
        elif path.is_file():
            raise LabError(f"{item} is not an image file ({', '.join(images.IMAGE_SUFFIXES)}); this run classifies images")
        else:
            raise LabError(f"{item!r} is not an image file or folder; a run of exercise 3 classifies images")
    return paths


# ---------------------------------------------------------------------------------------------
# One predictor per exercise: inputs -> (predicted class ids, scores, top-5 ids or None), class names
# ---------------------------------------------------------------------------------------------

def predict_exercise_1(run_dir: Path, results: dict, texts: list[str], stage: str, batch_size: int):
    import exercise_1

    classifier, encoder = exercise_1.load_classifier(run_dir, stage)
    model, tokenizer = exercise_1.load_encoder(model_source(run_dir, results["config"], encoder["model_name"]),
                                               encoder.get("trust_remote_code", False))
    model = exercise_1.quantize_encoder(model, encoder.get("quantize"))  # the features the classifier was fitted on
    device = "cpu" if encoder.get("quantize") else utils.best_device()  # int8 Linear layers run on CPU only
    features = exercise_1.extract_features(model, tokenizer, texts, encoder["pooling"], encoder["max_length"],
                                           batch_size, device, desc="features",
                                           precision=devices.replay_precision(encoder.get("mixed_precision", "no"), device))
    predicted, scores = exercise_1.predict_scored(classifier, features)
    return predicted, scores, None, encoder["label_names"]


def find_checkpoint(run_dir: Path, results: dict) -> Path:
    """The run's best checkpoint, also when the run folder has moved since."""
    best = results.get("best_checkpoint")
    if not best:
        raise LabError(f"{run_dir}/results.json names no best checkpoint; the run did not finish")
    for candidate in (Path(best), run_dir / Path(best).name):
        if (candidate / "config.json").is_file():
            return candidate
    raise LabError(f"the best checkpoint of {run_dir} ({Path(best).name}) is missing: deleted or moved")


def predict_exercise_2(run_dir: Path, results: dict, texts: list[str], stage: str, batch_size: int):
    config, names = results["config"], results["label_names"]
    lora = (config.get("lora") or {}).get("enabled")
    if lora and not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise LabError(f"{run_dir} has no adapter/ (adapter_config.json): the LoRA run did not finish")
    checkpoint = None if lora else find_checkpoint(run_dir, results)
    import torch
    from transformers import AutoModelForSequenceClassification

    import exercise_2
    import hub
    import LoRA

    if lora:
        utils.set_seed(config["seed"])   # as the run did: any head weight the adapter lacks starts the same
        model, tokenizer = exercise_2.load_classifier(model_source(run_dir, config, config["model_name"]), names,
                                                      config["trust_remote_code"])
        model = LoRA.load_adapter(model, run_dir / "adapter")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint, use_safetensors=None)
        has_tokenizer = any((checkpoint / name).exists() for name in hub.TOKENIZER_FILES)
        tokenizer = hub.load_tokenizer(str(checkpoint) if has_tokenizer else
                                       hub.resolve_pretrained(model_source(run_dir, config, config["model_name"])),
                                       config["trust_remote_code"])
    device = utils.best_device()
    model.eval().to(device)
    max_length = hub.usable_max_length(config["max_length"], tokenizer, model.config)   # as the run capped it
    # the precision the run evaluated in: the Trainer autocasts to it with mixed precision
    precision = devices.replay_precision(config.get("mixed_precision", "no"), device)
    predicted, scores = [], []
    with torch.inference_mode(), devices.autocast(device, precision):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt").to(device)
            best = model(**batch).logits.float().softmax(dim=-1).max(dim=-1)
            predicted.append(best.indices.cpu().numpy())
            scores.append(best.values.cpu().numpy())
    return np.concatenate(predicted), np.concatenate(scores), None, names


def predict_exercise_3(run_dir: Path, results: dict, paths: list[str], stage: str, batch_size: int):
    import torch

    import clip
    import LoRA

    config, names = results["config"], results["label_names"]
    if stage == "lora" and not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise LabError(f"{run_dir} has no adapter/ (adapter_config.json): the run did not finish")
    if stage == "fine_tuned" and not (run_dir / "model" / "config.json").is_file():
        raise LabError(f"{run_dir} has no model/ folder: the run did not finish (or predates predict.py)")
    model, tokenizer, image_processor = clip.load_clip(model_source(run_dir, config, config["model_name"]),
                                                       config["trust_remote_code"])
    if stage == "lora":
        model = LoRA.load_adapter(model, run_dir / "adapter")
    elif stage == "fine_tuned":
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(run_dir / "model")
    device = utils.best_device()
    model.eval().to(device)
    templates = results.get("prompts") or clip.TEMPLATES["single"]     # the run's own prompts
    precision = devices.replay_precision(config.get("mixed_precision", "no"), device)
    classifier = clip.build_zero_shot_classifier(model, tokenizer, names, templates, precision=precision)
    transform = clip.ImageTransform(image_processor, on_bad_image="fail")
    predicted, scores, top = [], [], []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            decoded = []
            for path in paths[start:start + batch_size]:
                try:
                    decoded.append(images.open_rgb(path))
                except Exception as error:  # PIL raises many kinds for a bad file
                    raise LabError(f"cannot read image {path}: {error}") from None
            # the run's own transform, so its pixels are the run's (pixels.py where it applies, else the processor)
            pixels = torch.stack(transform({"image": decoded, "label": [0] * len(decoded)})["pixel_values"])
            logits = clip.zero_shot_logits(model, pixels, classifier, precision)
            best = logits.topk(min(5, len(names)), dim=-1)
            top.append(best.indices.cpu().numpy())
            predicted.append(best.indices[:, 0].cpu().numpy())
            scores.append((best.values[:, 0] - logits.logsumexp(dim=-1)).exp().cpu().numpy())
    return np.concatenate(predicted), np.concatenate(scores), np.concatenate(top), names


PREDICTORS = {"exercise_1": predict_exercise_1, "exercise_2": predict_exercise_2, "exercise_3": predict_exercise_3}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def prediction_rows(inputs, predicted, scores, top, names) -> list[dict]:
    rows = []
    for index, item in enumerate(inputs):
        row = {"input": item, "predicted": names[int(predicted[index])], "score": round(float(scores[index]), 6)}
        if top is not None:
            row["top5"] = "|".join(names[int(k)] for k in top[index])
        rows.append(row)
    return rows


def format_table(rows: list[dict], width: int = 60) -> str:
    shorten = lambda text: text if len(text) <= width else text[:width - 3] + "..."
    cells = [["input", "predicted", "score"]] + [[shorten(row["input"]), row["predicted"], f"{row['score']:.4f}"]
                                                 for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_output(output: str | None) -> Path | None:
    """The --output path, if it can be written: checked before any model is loaded."""
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir() or not path.parent.is_dir():
        problem = "is a folder" if path.is_dir() else f"folder {path.parent} does not exist"
        raise LabError(f"--output {output}: {problem}")
    return path


def write_csv(rows: list[dict], path: Path) -> None:
    try:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as error:
        raise LabError(f"cannot write --output {path}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> list[dict]:
    """Classify the inputs; returns the rows printed (input, predicted, score, and top5 for images)."""
    args = parse_args(list(argv or []))
    run_dir, results = load_run(args.run)
    exercise = results["exercise"]
    stage = choose_stage(results, args.stage)
    output = check_output(args.output)
    inputs = read_image_paths(args.inputs) if exercise == "exercise_3" else read_texts(args.inputs, args.text_column)
    if not inputs:
        raise LabError("no inputs to classify: the files given hold no text")
    batch_size = args.batch_size or results["config"].get("eval_batch_size") or 32
    predicted, scores, top, names = PREDICTORS[exercise](run_dir, results, inputs, stage, batch_size)
    rows = prediction_rows(inputs, predicted, scores, top, names)
    print(f"{run_dir} ({exercise}, stage {stage}; score: {SCORES[stage]})\n\n{format_table(rows)}")
    if output:
        write_csv(rows, output)
        print(f"\nwrote {len(rows)} predictions to {output}")
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
