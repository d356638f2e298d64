"""The linear probe of exercise 3: frozen CLIP image features into scikit-learn logistic regression, C chosen on a
split carved from train, one probe per number of labelled images per class (few-shot).

Which features: by default the image tower's pooled output before the projection into the shared image-text space
(`I_f` in figure 3 of the CLIP paper), which is what the paper's linear-probe evaluation fits (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", appendix A.3): the projection is trained
only to meet the text tower, and a probe needs no text. `probe_features=embedding` probes the projected, normalised
features instead, the ones zero-shot compares with the prompts (as the CLIP repository's README example and
CLIP_benchmark do).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import clip
import devices
from utils import LabError

FEATURES = ("pre_projection", "embedding")
# rows x feature width x classes below which a probe is fitted on one BLAS thread
SMALL_FIT = 2 ** 30


def batch_features(model, pixel_values: torch.Tensor, layer: str = "pre_projection", precision: str = "no"):
    """(batch, dim) float32 image features of the frozen image tower, before or after its projection."""
    core = clip.clip_core(model)
    device = next(core.parameters()).device
    with devices.autocast(device.type, precision):
        pooled = core.vision_model(pixel_values=pixel_values.to(device, non_blocking=True)).pooler_output
        if layer == "embedding":
            pooled = F.normalize(core.visual_projection(pooled).float(), dim=-1)
    return pooled.float().cpu().numpy()


def feature_width(model, layer: str) -> int:
    config = clip.clip_core(model).config
    return config.projection_dim if layer == "embedding" else config.vision_config.hidden_size


def image_features(model, dataset, collator, batch_size: int, num_workers: int = 0, layer: str = "pre_projection",
                   precision: str = "no", desc: str = "probe features") -> np.ndarray:
    """(rows, dim) features of every row of a transformed image dataset, a row of NaN for an unreadable image.
    Under torchrun each process computes its share of the rows and every process gets them all, in row order."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    # its own generator: a loader draws its workers' seeds from the global RNG, and a run whose features come from
    # the cache would then train from another random state than one that computed them
    _, loader = clip.share_loader(dataset, collator, batch_size, num_workers, next(model.parameters()).device.type,
                                  generator=torch.Generator())
    parts = [np.empty((0, feature_width(model, layer)), np.float32)]
    with torch.inference_mode(), clip.eval_mode(model):
        for batch in tqdm(loader, desc=desc, unit="batch"):
            kept = batch["kept"].numpy()
            features = np.full((len(kept), parts[0].shape[1]), np.nan, np.float32)
            if kept.any():
                features[kept] = batch_features(model, batch["pixel_values"], layer, precision)
            parts.append(features)
    return np.concatenate(gather_object([np.concatenate(parts)]))


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, carved) rows: of each class's rows, a seeded `fraction` (at least one where the class has two or more)
    is carved out to choose C on; the probes draw their images from the rest."""
    rng = np.random.default_rng(seed)
    rest, carved = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        take = max(1, round(fraction * len(rows))) if len(rows) >= 2 and fraction > 0 else 0
        carved.append(rows[:take])
        rest.append(rows[take:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(carved))


def shot_rows(labels: np.ndarray, rows: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """`shots` seeded rows of each class among `rows` (all of a class's rows where it has fewer; all when None)."""
    if shots is None:
        return rows
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(rows[labels[rows] == label])[:shots] for label in np.unique(labels[rows])]
    return np.sort(np.concatenate(picked))


def usable_shots(requested: list, labels: np.ndarray, rows: np.ndarray) -> list[int | None]:
    """The requested numbers of images per class, "all" as None. A k that no class has more than k images for
    gives the same probe as "all": it is dropped with a note, and only "all" is fitted."""
    most = int(np.bincount(labels[rows]).max()) if len(rows) else 0
    shots = [None if k == "all" else int(k) for k in requested]
    kept = [k for k in shots if k is None or k < most]
    dropped = [k for k in shots if k not in kept]
    if dropped:
        print(f"note: probe_shots {dropped}: no class has more than {most} train images left after the carve, so "
              f"{'they are' if len(dropped) > 1 else 'it is'} the same probe as 'all'")
        if None not in kept:
            kept.append(None)
    return list(dict.fromkeys(kept))


def stage_name(shots: int | None) -> str:
    return "linear_probe_all" if shots is None else f"linear_probe_{shots}shot"


def make_probe(C: float, max_iter: int, seed: int):
    """Logistic regression on standardized features (scikit-learn's lbfgs, multinomial), warm-started so that a
    sweep over C begins each fit where the previous one ended."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed, warm_start=True))


def fit_probe(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, choose_rows: np.ndarray, grid: list[float],
              max_iter: int, seed: int):
    """(the probe fitted on `rows` with the C of `grid` best on `choose_rows`, that C, accuracy by C)."""
    import copy
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    classes = len(np.unique(labels[rows]))
    if classes < 2:
        raise LabError(f"the linear probe needs train images of at least 2 classes, found {classes}")
    if not len(choose_rows) and len(grid) > 1:      # nothing carved to choose on: the C nearest scikit-learn's default
        grid = [min(grid, key=lambda C: abs(np.log(C)))]
        print(f"note: no class has 2 train images to carve from, so the probe cannot choose C; using C={grid[0]:g}")
    grid = sorted(grid)
    probe, scores, best = make_probe(grid[0], max_iter, seed), {}, None
    # a product this small is done before BLAS's threads are handed their shares, and they spin while they wait:
    # on busy cores that costs far more than the work itself
    small = len(rows) * features.shape[1] * classes < SMALL_FIT
    for C in grid:
        probe.set_params(logisticregression__C=C)
        with warnings.catch_warnings(), threadpool_limits(1 if small else None, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)   # the iteration cap is a setting (probe_max_iter)
            warnings.filterwarnings("ignore", "The number of unique classes", UserWarning)   # few-shot: by design
            probe.fit(features[rows], labels[rows])
        if len(choose_rows):
            scores[C] = float((probe.predict(features[choose_rows]) == labels[choose_rows]).mean())
        if best is None or scores.get(C, 0.0) > scores.get(best[0], 0.0):
            best = (C, copy.deepcopy(probe))      # the next C warm-starts from this fit and changes it
    return best[1], best[0], scores


def top_classes(probe, features: np.ndarray, num_classes: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(top-k class ids, best first; probability of the best) for each row, as evaluate.top_classes gives them for
    zero-shot logits. A class the probe never saw in training has probability 0."""
    import evaluate

    log_probabilities = torch.full((len(features), num_classes), -torch.inf, dtype=torch.float64)
    log_probabilities[:, probe.classes_] = torch.from_numpy(probe.predict_log_proba(features).astype(np.float64))
    top, best = evaluate.top_classes(log_probabilities, min(k, num_classes))
    return top, best.astype(np.float32)


def cached_image_features(cache_dir, model_name: str, model, splits: dict, collator, config: dict, precision: str,
                          workers: int, use_cache: bool = True, write: bool = True) -> dict:
    """image_features of each split ({name: (raw split, transformed split)}), cached on disk (cache.py) under
    everything that changes them: the model's files, the images, the layer and the precision; only a process
    with `write` (the main one) writes the entries."""
    import cache
    import images

    model_key = cache.model_fingerprint(model_name) if use_cache else None
    features = {}
    for split, (raw, transformed) in splits.items():
        compute = lambda: image_features(model, transformed, collator, config["eval_batch_size"], workers,
                                         config["probe_features"], precision, desc=f"probe features ({split})")
        if not use_cache:
            features[split] = compute()
            continue
        key = {"model": model_key, "split": split, "layer": config["probe_features"],
               "images": cache.texts_fingerprint([images.image_id(item) for item in raw["image"]]),
               "precision": precision, "kind": "clip image features"}
        features[split], hit = cache.cached_array(cache_dir, key, compute, rows=len(raw), dtype=np.float32, write=write)
        if hit:
            print(f"probe features {split}: reused cached features {features[split].shape}")
    return features


def probe_stages(train: np.ndarray, train_labels: np.ndarray, validation: np.ndarray, validation_labels: np.ndarray,
                 names: list[str], config: dict) -> tuple[dict, dict, dict]:
    """(results, what each probe was fitted on, fit seconds) by stage name, one probe per `probe_shots` entry:
    fitted on that many seeded train images per class, C chosen on the split carved from train, scored on the
    validation images. Rows of NaN (unreadable images) take no part."""
    import time

    # float64 into lbfgs: in float32 its gradient's rounding follows BLAS's thread count, and so does where it stops
    train, validation = train.astype(np.float64), validation.astype(np.float64)
    readable = np.flatnonzero(~np.isnan(train[:, 0]))
    if not len(readable):
        raise LabError(f"every image of the train split is unreadable ({len(train)} images); the linear probe has "
                       f"nothing to fit on: check the image files, or linear_probe=False")
    rest, carved = (readable[part] for part in carve(train_labels[readable], config["probe_validation_fraction"],
                                                        config["seed"]))
    rows = np.flatnonzero(~np.isnan(validation[:, 0]))
    if not len(rows):
        raise LabError("every image of the validation split is unreadable; the linear probe has nothing to score")
    results, fitted, seconds = {}, {}, {}
    for shots in usable_shots(config["probe_shots"], train_labels, rest):
        start = time.perf_counter()
        train_rows = shot_rows(train_labels, rest, shots, config["seed"])
        classifier, C, scores = fit_probe(train, train_labels, train_rows, carved, config["probe_C"],
                                          config["probe_max_iter"], config["seed"])
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        top, best = top_classes(classifier, validation[rows], len(names))
        metrics, matrix, recall, pairs = clip.zero_shot_metrics(validation_labels[rows], top, names)
        stage = stage_name(shots)
        results[stage] = clip.ZeroShotResult(metrics, validation_labels[rows], top, rows, matrix, recall, pairs,
                                             seconds=time.perf_counter() - start, scores=best)
        fitted[stage] = {"shots": "all" if shots is None else shots, "train_images": len(train_rows),
                         "images_per_class": round(len(train_rows) / len(np.unique(train_labels[train_rows])), 2),
                         "C": C, "carved_accuracy_by_C": {str(c): s for c, s in scores.items()},
                         "carved_images": len(carved), "features": config["probe_features"]}
        seconds[stage] = round(fit_seconds, 3)
        print(f"{stage}: {len(train_rows)} train images, C={C}, validation accuracy {metrics['accuracy']:.4f}")
    return results, fitted, seconds
