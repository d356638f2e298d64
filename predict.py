"""Predict: classify new sentences or images with a finished run of any exercise.

    python predict.py runs/rt "a gripping, funny film" "dull and far too long"   # sentences
    python predict.py runs/rt reviews.txt --output predicted.csv                 # one text per line
    python predict.py runs/rt reviews.csv --text-column review                   # a column of a CSV/TSV
    python predict.py runs/clip photos/ cat.jpg                                  # images, folders (exercise 3)
    python predict.py runs/clip photos/ --scale 0.5                              # halfway back to zero-shot (WiSE-FT)

results.json in the run folder says which exercise made it, and each loads what its run saved:
exercise 1 the fitted classifier (`classifiers/<stage>.skops`, never pickle) and the frozen encoder,
pooling and max_length it was fitted on; exercise 2 its best checkpoint (with LoRA, `adapter/` on the
base model); exercise 3 CLIP with the run's adapter (`adapter/`, or `model/` when every weight was
trained), class names and prompts. The score is the predicted class's probability (an SVC's margin).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

import artifacts
import devices
import evaluate
import images
import tables
import utils
from utils import LabError

TEXT_FILES = (".txt", ".csv", ".tsv")
# what each kind of saved model folder must hold (artifacts.check_folder also checks every JSON file in it)
MODEL_FILES, ADAPTER_FILES = ("config.json", "model.safetensors"), ("adapter_config.json", "adapter_model.safetensors")
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
    parser.add_argument("--scale", type=float, metavar="ALPHA", help="exercise 3: the trained update scaled by ALPHA "
                        "(0: the model before training, 1: as trained, the default; the run's wise_alphas stages)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="inputs per forward pass (default: the run's eval_batch_size)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable input (an image that does "
                        "not decode, a file that is empty or not UTF-8) instead of skipping it with a warning")
    args = parser.parse_args(argv)
    if args.scale is not None and not math.isfinite(args.scale):
        raise LabError(f"--scale must be a finite number, got {args.scale}")
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
    if not path.exists():
        inside = sorted(child.name for child in run_dir.iterdir() if (child / RESULTS_FILE).is_file())
        why = (f"it holds run folders ({', '.join(inside[:5])}); give one" if inside
               else "the run did not finish (or this is not a run folder)")
        raise LabError(f"{folder} has no {RESULTS_FILE}: {why}")
    results = artifacts.read_json(path, "rerun the exercise that made the run to write it again",
                                  {"exercise": str, "config": dict, "label_names": list})
    if results["exercise"] not in STAGES:
        raise LabError(f"{path} is from {results['exercise']}; predict works with runs of {', '.join(STAGES)}")
    return run_dir, results


def remake(run_dir: Path, results: dict) -> str:
    """What to do about a damaged file of a finished run: make the run again."""
    return f"rerun {results['exercise']}.py with the settings in {run_dir / 'results.json'} to save it again"


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


class Unreadable(NamedTuple):
    """An input file that cannot be read, and why: `f"{input} is {reason}"` reads as a sentence."""
    input: str
    reason: str


def unreadable_error(bad: list[Unreadable], strict: bool = False) -> LabError:
    """The one line for unreadable inputs that leave nothing to classify, or (`strict`) for the first of them."""
    if strict:
        return LabError(f"{bad[0].input} is {bad[0].reason}; --strict stops at the first unreadable input "
                        f"(without it, unreadable inputs are skipped with a warning)")
    return LabError(f"{'no input can' if len(bad) > 1 else 'the input cannot'} be read, nothing to classify: "
                    f"{name_unreadable(bad)}; fix or replace {'them' if len(bad) > 1 else 'it'}")


def name_unreadable(bad: list[Unreadable]) -> str:
    """The first three unreadable inputs and why, and how many more: one line however many there are."""
    return "; ".join(f"{item.input} is {item.reason}" for item in bad[:3]) + (f"; and {len(bad) - 3} more"
                                                                              if len(bad) > 3 else "")


def looks_like_file(item: str) -> bool:
    return not any(c.isspace() for c in item) and Path(item).suffix.lower() in (*TEXT_FILES, *images.IMAGE_SUFFIXES)


def read_texts(inputs: list[str], text_column: str) -> list[str | Unreadable]:
    """Sentences as given, lines of text files, a column of CSV/TSV files, lines of stdin for `-`; a file
    that cannot be read is kept, in its place, as Unreadable."""
    texts = []
    for item in inputs:
        path = Path(item).expanduser()
        if item == "-":
            texts += [line.strip() for line in sys.stdin if line.strip()]
        elif path.is_dir() or path.suffix.lower() in images.IMAGE_SUFFIXES and path.exists():
            raise LabError(f"{item} is {'a folder' if path.is_dir() else 'an image'}; this run classifies text: "
                           f"give sentences or .txt/.csv files")
        elif path.is_file():
            found = texts_from_file(path, text_column)
            texts += [found] if isinstance(found, Unreadable) else found
        elif looks_like_file(item):
            raise LabError(f"input file {item} does not exist")
        else:
            texts.append(item)
    return texts


def texts_from_file(path: Path, text_column: str) -> list[str] | Unreadable:
    """The texts in one file, or why it cannot be read. A table without `text_column` is the flag's problem,
    not the file's: LabError, as skipping it would hide a wrong --text-column."""
    import pandas as pd

    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", encoding="utf-8")
            if text_column not in frame.columns:
                raise LabError(f"{path} has no column {text_column!r} (columns: {list(frame.columns)}); "
                               f"set --text-column")
            texts = frame[text_column].dropna().astype(str).tolist()
        else:   # lines end at "\n" only: str.splitlines() would also cut at U+0085 and U+2028 inside a text
            texts = [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except UnicodeDecodeError as error:
        return Unreadable(str(path), f"not UTF-8 text ({error.reason} at byte {error.start})")
    except pd.errors.EmptyDataError:
        return Unreadable(str(path), "empty")
    except (OSError, pd.errors.ParserError) as error:
        first = str(getattr(error, "strerror", None) or error).strip().splitlines()[0]
        return Unreadable(str(path), f"not readable ({first})")
    return texts or Unreadable(str(path), "empty")


def read_image_paths(inputs: list[str]) -> list[str]:
    """Image files as given, and every image below a folder (sorted)."""
    paths = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = images.image_files(path)
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
# One predictor per exercise: inputs -> (predicted class ids, scores, top-5 ids or None, class names,
# {index of an input: why it could not be read}); texts were read before (read_texts), images are decoded here
# ---------------------------------------------------------------------------------------------

def predict_exercise_1(run_dir: Path, results: dict, texts: list[str], stage: str, batch_size: int, strict: bool):
    import exercise_1
    import saved_classifiers

    classifier, encoder = saved_classifiers.load_fitted_classifier(run_dir, stage)
    model, tokenizer = exercise_1.load_encoder(model_source(run_dir, results["config"], encoder["model_name"]),
                                               encoder.get("trust_remote_code", False))
    model = exercise_1.quantize_encoder(model, encoder.get("quantize"))  # the features the classifier was fitted on
    device = "cpu" if encoder.get("quantize") else utils.best_device()  # int8 Linear layers run on CPU only
    features = exercise_1.extract_features(model, tokenizer, texts, encoder["pooling"], encoder["max_length"],
                                           batch_size, device, desc="features",
                                           precision=devices.replay_precision(encoder.get("mixed_precision", "no"), device))
    predicted, scores = exercise_1.predict_scored(classifier, features)
    return predicted, scores, None, encoder["label_names"], {}


def find_checkpoint(run_dir: Path, results: dict) -> Path:
    """The run's best checkpoint: the one in its folder (also when the folder was moved or copied since), else
    where results.json says it was saved."""
    best = results.get("best_checkpoint")
    if not best:
        raise LabError(f"{run_dir}/results.json names no best checkpoint; the run did not finish")
    for candidate in (run_dir / Path(best).name, Path(best)):
        if candidate.exists():
            return artifacts.check_folder(candidate, MODEL_FILES, remake(run_dir, results))
    raise LabError(f"the best checkpoint of {run_dir} ({Path(best).name}) is missing: deleted or moved")


def predict_exercise_2(run_dir: Path, results: dict, texts: list[str], stage: str, batch_size: int, strict: bool):
    config, names = results["config"], results["label_names"]
    lora = (config.get("lora") or {}).get("enabled")
    if lora and not (run_dir / "adapter").exists():
        raise LabError(f"{run_dir} has no adapter/ (adapter_config.json): the LoRA run did not finish")
    if lora:
        artifacts.check_folder(run_dir / "adapter", ADAPTER_FILES, remake(run_dir, results))
    checkpoint = None if lora else find_checkpoint(run_dir, results)
    import torch
    from transformers import AutoModelForSequenceClassification

    import exercise_2
    import hub
    import LoRA

    if lora:
        utils.set_seed(config["seed"])   # as the run did: any head weight the adapter lacks starts the same
        model, tokenizer = exercise_2.load_sequence_classifier(model_source(run_dir, config, config["model_name"]), names,
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
    return np.concatenate(predicted), np.concatenate(scores), None, names, {}


def predict_exercise_3(run_dir: Path, results: dict, paths: list[str], stage: str, batch_size: int, strict: bool,
                       scale: float | None = None):
    import clip
    import LoRA

    config, names = results["config"], results["label_names"]
    if stage == "lora" and not (run_dir / "adapter").exists():
        raise LabError(f"{run_dir} has no adapter/ (adapter_config.json): the run did not finish")
    if stage == "fine_tuned" and not (run_dir / "model").exists():
        raise LabError(f"{run_dir} has no model/ folder: the run did not finish (or predates predict.py)")
    if scale is not None and stage == "zero_shot":
        raise LabError("--scale scales what training changed: it applies to the trained stage, not --stage zero_shot")
    if stage != "zero_shot":
        folder, required = ("adapter", ADAPTER_FILES) if stage == "lora" else ("model", MODEL_FILES)
        artifacts.check_folder(run_dir / folder, required, remake(run_dir, results))
    model, tokenizer, image_processor = clip.load_clip(model_source(run_dir, config, config["model_name"]),
                                                       config["trust_remote_code"])
    if stage == "lora":
        model = LoRA.load_adapter(model, run_dir / "adapter")
    elif stage == "fine_tuned":
        from transformers import CLIPModel

        base, model = model, CLIPModel.from_pretrained(run_dir / "model")
    # what --scale starts from: PEFT keeps the originals of modules_to_save; every weight trained: the model as loaded
    initial = {} if scale is None else LoRA.initial_weights(model if stage == "lora" else base)
    device = utils.best_device()
    model.eval().to(device)
    templates = results.get("prompts") or clip.TEMPLATES["single"]     # the run's own prompts
    precision = devices.replay_precision(config.get("mixed_precision", "no"), device)
    with LoRA.interpolated(model, scale, initial) if scale is not None else contextlib.nullcontext():
        return classify_images(model, tokenizer, image_processor, names, templates, precision, paths, batch_size, strict)


def classify_images(model, tokenizer, image_processor, names, templates, precision, paths, batch_size, strict):
    """Zero-shot classification of image files against the head `model`'s text tower builds for `names`."""
    import torch

    import clip

    classifier = clip.build_zero_shot_classifier(model, tokenizer, names, templates, precision=precision)
    transform = clip.ImageTransform(image_processor, on_bad_image="fail")
    predicted, scores, top, unreadable = [], [], [], {}
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            decoded = []
            for index in range(start, min(start + batch_size, len(paths))):
                try:
                    decoded.append(images.open_rgb(paths[index]))
                except Exception as error:  # PIL raises many kinds for a bad file
                    unreadable[index] = "empty" if not Path(paths[index]).stat().st_size else \
                        f"not a readable image ({error})"
                    if strict:
                        raise unreadable_error([Unreadable(paths[index], unreadable[index])], strict) from None
            if not decoded:
                continue
            # the run's own transform, so its pixels are the run's (pixels.py where it applies, else the processor)
            pixels = torch.stack(transform({"image": decoded, "label": [0] * len(decoded)})["pixel_values"])
            logits = clip.zero_shot_logits(model, pixels, classifier, precision)
            best, probability = evaluate.top_classes(logits, min(5, len(names)))
            top.append(best)
            predicted.append(best[:, 0])
            scores.append(probability)
    if not predicted:
        raise unreadable_error([Unreadable(paths[index], reason) for index, reason in unreadable.items()])
    return np.concatenate(predicted), np.concatenate(scores), np.concatenate(top), names, unreadable


PREDICTORS = {"exercise_1": predict_exercise_1, "exercise_2": predict_exercise_2, "exercise_3": predict_exercise_3}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def prediction_rows(entries, predicted, scores, top, names) -> list[dict]:
    """One row per input, in order: `skipped` is empty, or (with `predicted` and `score` empty) why the input
    was not classified, so every row of --output has the same columns and reads back with any CSV reader."""
    rows, done = [], 0
    for entry in entries:
        if isinstance(entry, Unreadable):
            empty = {"predicted": "", "score": None, **({"top5": ""} if top is not None else {})}
            rows.append({"input": entry.input, **empty, "skipped": entry.reason})
            continue
        row = {"input": entry, "predicted": names[int(predicted[done])], "score": round(float(scores[done]), 6)}
        if top is not None:
            row["top5"] = "|".join(names[int(k)] for k in top[done])
        rows.append({**row, "skipped": ""})
        done += 1
    return rows


def format_table(rows: list[dict], width: int = 60) -> str:
    """The rows as the terminal shows them: each input cut to `width` characters, its class and score."""
    shorten = lambda text: text if len(text) <= width else text[:width - 3] + "..."
    return tables.text_table(["input", "predicted", "score"], [
        [shorten(row["input"]), row["predicted"] or "(skipped)", "" if row["skipped"] else f"{row['score']:.4f}"]
        for row in rows])


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
    """Classify the inputs; returns the rows printed (input, predicted, score, top5 for images, skipped)."""
    args = parse_args(list(argv or []))
    run_dir, results = load_run(args.run)
    exercise = results["exercise"]
    stage = choose_stage(results, args.stage)
    output = check_output(args.output)
    entries = read_image_paths(args.inputs) if exercise == "exercise_3" else read_texts(args.inputs, args.text_column)
    readable = [entry for entry in entries if not isinstance(entry, Unreadable)]
    bad = [entry for entry in entries if isinstance(entry, Unreadable)]
    if bad and (args.strict or not readable):       # before any model is loaded
        raise unreadable_error(bad, args.strict)
    if not readable:
        raise LabError("no inputs to classify: the files given hold no text")
    batch_size = args.batch_size or results["config"].get("eval_batch_size") or 32
    if args.scale is not None and exercise != "exercise_3":
        raise LabError(f"--scale applies to runs of exercise 3 (its adapter interpolation), not {exercise}")
    scaled = {"scale": args.scale} if exercise == "exercise_3" else {}
    predicted, scores, top, names, unreadable = PREDICTORS[exercise](run_dir, results, readable, stage, batch_size,
                                                                     args.strict, **scaled)
    positions = [index for index, entry in enumerate(entries) if not isinstance(entry, Unreadable)]
    for index, reason in unreadable.items():        # images the predictor could not decode
        entries[positions[index]] = Unreadable(entries[positions[index]], reason)
    rows = prediction_rows(entries, predicted, scores, top, names)
    print(f"{run_dir} ({exercise}, stage {stage}; score: {SCORES[stage]})\n\n{format_table(rows)}")
    skipped = [entry for entry in entries if isinstance(entry, Unreadable)]
    if skipped:     # one warning, after the table, for every input left out
        marked = f"; marked in the skipped column of {output}" if output else ""
        print(f"warning: skipped {len(skipped)} unreadable input{'s' * (len(skipped) > 1)} ({len(rows) - len(skipped)} "
              f"classified): {name_unreadable(skipped)}{marked} (--strict stops instead)", file=sys.stderr)
    if output:
        write_csv(rows, output)
        print(f"\nwrote {len(rows) - len(skipped)} predictions to {output}"
              + (f", and {len(skipped)} rows saying why an input was skipped" if skipped else ""))
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
