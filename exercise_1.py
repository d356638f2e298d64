"""Exercise 1: how far do frozen transformer features plus a classic classifier go?

A pretrained encoder (DistilBERT by default) turns each movie review into one vector (the [CLS]
token or the mean over tokens); an SVC and a logistic-regression baseline learn sentiment from
those vectors. Nothing in the transformer is trained.

    python exercise_1.py                                   # Hub defaults (needs the Hub)
    python exercise_1.py model_name=<folder> dataset=<folder> pooling=mean
    python exercise_1.py --help                            # every key with its default
"""
from __future__ import annotations

import time

import numpy as np

import LoRA
import cache
import data
import devices
import evaluate
import faults
import hub
import plots
import loggers
import saved_classifiers
import utils


CONFIG = {
    # what to run on: a Hub id or a local folder for each
    "model_name": "distilbert-base-uncased",  # Hub id or local folder of the pretrained model
    "dataset": "cornell-movie-review-data/rotten_tomatoes",  # Hub id or local folder (see the README's Data section)
    "text_column": "text",           # column holding the text in table files
    "label_column": "label",         # column holding the label (ints or strings) in table files
    "max_train_samples": None,       # None = all; subsamples are stratified and seeded
    "max_eval_samples": None,        # None = all; validation and test subsamples, stratified and seeded
    # feature extraction
    "pooling": "cls",                # "cls" (first token, as the course asks) or "mean" (mask-aware)
    "max_length": 128,               # tokens per text; longer texts are truncated (capped at the model's limit)
    "eval_batch_size": 64,           # texts per forward pass (on CPU also at most 1024 tokens)
    "cache_features": True,          # reuse features from <output_dir>/cache when nothing changed
    "quantize": None,                # "int8": dynamic int8 Linear layers (CPU only): faster extraction, slightly different features
    "mixed_precision": "auto",       # extraction precision: auto (bf16 on Ampere+ GPUs, fp16 on older, fp32 on CPU), no, bf16, fp16
    # classifiers
    "standardize": True,             # z-score features before each classifier
    "svc_kernel": "rbf",             # SVC kernel
    "svc_solver": "auto",            # "exact" (libsvm), "approximate" (Nystroem kernel map + linear SVM), auto: exact up to 10,000 texts
    "svc_components": 1000,          # with svc_solver=approximate: Nystroem components approximating the kernel
    "svc_C": 1.0,                    # SVC regularisation (larger = less)
    "logreg_C": 1.0,                 # logistic regression regularisation (larger = less)
    "logreg_max_iter": 2000,         # logistic regression solver iterations
    "tune_C": False,                 # pick each classifier's C from C_grid on the validation split
    "C_grid": [0.01, 0.1, 1.0, 10.0],  # C values tried with tune_C=True
    # run bookkeeping and logging
    "output_dir": "runs",            # where run folders go
    "run_name": None,                # None = exercise_1-<time>
    "overwrite": False,              # replace an existing run folder of the same name
    "seed": 42,                      # seeds Python, NumPy, torch, splits and subsampling
    "wandb_mode": "offline",         # "offline" | "online" | "disabled"
    "wandb_project": "transformer-labs",  # W&B project the run is logged to
    "tensorboard": True,             # TensorBoard event files in <run>/tensorboard
    "trust_remote_code": False,      # run code shipped with a Hub model; only for models you trust
}
CHOICES = {"pooling": ("cls", "mean"), "svc_kernel": ("linear", "poly", "rbf", "sigmoid"),
           "svc_solver": ("auto", "exact", "approximate"),
           "wandb_mode": loggers.WANDB_MODES, "quantize": (None, "int8"), "mixed_precision": devices.PRECISIONS}
POSITIVE = ("max_train_samples", "max_eval_samples", "max_length", "eval_batch_size", "svc_C", "logreg_C",
            "logreg_max_iter", "C_grid", "svc_components")
INTEGERS = ("max_train_samples", "max_eval_samples")  # whole numbers (their default is None)


def main(argv: list[str] | None = None):
    # 1. config: defaults above, overridden by key=value arguments
    config = utils.parse_config(CONFIG, argv or [], CHOICES, POSITIVE, __file__, integers=INTEGERS)
    utils.check_run_name(config["run_name"])
    utils.check_output_dir(config["output_dir"])  # before any data or model is loaded
    device = utils.best_device()
    if config["quantize"] and device != "cpu":
        raise utils.LabError(f"quantize={config['quantize']} runs on CPU only (dynamic int8 Linear layers have no "
                             f"CUDA kernels) and this machine has {device}; leave quantize=None there")
    precision = "no" if config["quantize"] else devices.precision(config["mixed_precision"], device)
    devices.warn_slow_precision(precision, device)
    utils.set_seed(config["seed"])
    timing = {}
    start = time.perf_counter()

    # 2. data: train / validation / test with text and integer labels
    with utils.timed(timing, "load_data"):
        splits = data.load_text_dataset(config["dataset"], config["text_column"], config["label_column"],
                                        config["seed"], config["max_train_samples"], config["max_eval_samples"])
    label_names = splits["train"].features["label"].names
    print(f"data: {', '.join(f'{s} {len(d)}' for s, d in splits.items())}; classes {label_names}")

    # 3. the frozen encoder; the run folder and loggers only once data and model are in hand
    with utils.timed(timing, "load_model"):
        model, tokenizer = load_encoder(config["model_name"], config["trust_remote_code"])
        parameters = LoRA.count_parameters(model)[1]  # int8 Linear weights are packed buffers, not parameters
        model = quantize_encoder(model, config["quantize"])
    run_dir = utils.prepare_run_dir(config["output_dir"], config["run_name"], "exercise_1", config["overwrite"])
    logger = loggers.RunLoggers(run_dir, config, "exercise_1")

    # 4. one feature vector per text (embed_texts below is the loop; extract_features runs it faster), cached on
    #    disk keyed by everything that changes it; texts are cut at max_length tokens, or at the model's own limit
    #    when that is lower
    features, labels, throughput = {}, {}, {}
    model_key = cache.model_fingerprint(config["model_name"])
    max_length = hub.usable_max_length(config["max_length"], tokenizer, model.config)
    cache_dir, keys = run_dir.parent / "cache", []
    # what a run stopped from here on leaves: no results, and the features cached so far (a rerun reuses them)
    kept = lambda: f"no results written; {cache.kept_entries(cache_dir, keys)}"
    with utils.timed(timing, "features"):
        for split, dataset in splits.items():
            texts = dataset["text"]
            key = {"model": model_key, "texts": cache.texts_fingerprint(texts), "split": split,
                   "pooling": config["pooling"], "max_length": max_length,
                   # only when set, so fp32 entries written before these options existed stay valid
                   **({"quantize": config["quantize"]} if config["quantize"] else {}),
                   **({"precision": precision} if precision != "no" else {})}
            began = time.perf_counter()
            compute = lambda: extract_features(model, tokenizer, texts, config["pooling"], max_length,
                                               config["eval_batch_size"], device, desc=f"features {split}",
                                               precision=precision)
            with faults.stage(f"features {split}", kept):
                if config["cache_features"]:
                    keys.append(key)
                    features[split], hit = cache.cached_array(cache_dir, key, compute, rows=len(texts), dtype=np.float32)
                else:
                    features[split], hit = compute(), False
            if hit:
                print(f"features {split}: reused cached features {features[split].shape}")
            else:
                throughput[split] = round(len(texts) / (time.perf_counter() - began), 1)
            labels[split] = np.asarray(dataset["label"])
    if throughput:
        print(f"extraction throughput (sentences/s): {throughput}")

    # 5-6. the classifiers, each a stage evaluated on validation and test
    #      (each split's per-sample predictions in <run>/predictions, each fitted classifier in <run>/classifiers)
    metrics, reports, matrices, chosen, classifiers = {}, {}, {}, {}, {}
    with faults.stage("writing the results", kept):
        for stage in ("svc", "logreg"):
            with utils.timed(timing, stage), faults.stage(f"fitting and scoring the {stage} classifier", kept):
                classifier, chosen[stage] = fit_classifier(stage, config, features, labels)
                classifiers[stage] = classifier
                metrics[stage], matrices[stage] = {}, {}
                for split in ("validation", "test"):
                    predicted, scores = predict_scored(classifier, features[split])
                    metrics[stage][split] = evaluate.classification_metrics(labels[split], predicted)
                    matrices[stage][split] = evaluate.confusion(labels[split], predicted, len(label_names)).tolist()
                    evaluate.write_predictions(run_dir, stage, split, range(len(predicted)), splits[split]["text"],
                                               labels[split], predicted, scores, label_names)
                reports[stage] = evaluate.classification_report_text(labels["test"], predicted, label_names)
            figure = plots.plot_confusion_matrix(np.asarray(matrices[stage]["test"]), label_names,
                                                 run_dir / f"confusion_{stage}_test.png", f"{stage} on test")
            logger.log_figure(f"{stage}/confusion_test", figure)
            logger.log_text(f"{stage}/classification_report_test", reports[stage])
            logger.log_metrics(metrics[stage], prefix=f"{stage}.")
        saved_classifiers.save_fitted_classifiers(run_dir, classifiers, {**config, "mixed_precision": precision},
                                                  label_names)
        timing["total"] = round(time.perf_counter() - start, 3)

        # 7. results file and summary
        model_info = {"name": config["model_name"], "parameters": parameters,
                      "hidden_size": int(features["train"].shape[1]), "pooling": config["pooling"],
                      "quantize": config["quantize"], "precision": precision}
        evaluate.write_results(run_dir, "exercise_1", config, metrics, timing, model_info,
                               label_names=label_names, classifiers=chosen, confusion_matrices=matrices,
                               classification_reports=reports, throughput_sentences_per_s=throughput,
                               data_sizes={split: len(dataset) for split, dataset in splits.items()})
    logger.finish()
    print(f"\n{evaluate.results_table(metrics)}\n\nrun folder: {run_dir}")
    return run_dir


# ---------------------------------------------------------------------------------------------
# The lesson: one vector per text from a frozen encoder (tokenize, forward pass, pool)
# ---------------------------------------------------------------------------------------------

def embed_texts(model, tokenizer, texts: list[str], pooling: str = "cls", max_length: int = 128, batch_size: int = 64,
                device: str = "cpu", precision: str = "no") -> np.ndarray:
    """The lesson: one vector per text from a frozen encoder, (n, dim) float32 in the order of `texts`
    (max_length within the model's limit; the encoder runs in `precision`, see devices.precision)."""
    vectors = []
    for start in range(0, len(texts), batch_size):
        # 1. tokenize: token ids cut at max_length and padded (after the text, so [CLS] stays first) to the
        #    batch's longest text, with an attention mask marking the real tokens
        batch = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                          padding=True, padding_side="right", return_tensors="pt")
        vectors.append(embed_batch(model, batch, pooling, device, precision))
    return np.concatenate(vectors)


def embed_batch(model, batch, pooling: str, device: str, precision: str) -> np.ndarray:
    """Steps 2 and 3 of embed_texts, for one tokenized batch: (batch, dim) float32."""
    import torch

    batch = devices.to_device(batch, device)
    # 2. forward: the encoder's last hidden states, one vector per token: (batch, tokens, dim)
    with torch.inference_mode(), devices.autocast(device, precision):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # 3. pool: one vector per text, the first token's or the mean over the real tokens
    return pool(hidden.float(), batch["attention_mask"], pooling).cpu().numpy()


def pool(hidden, attention_mask, pooling: str):
    """(batch, seq, dim) hidden states -> (batch, dim): first token (`cls`) or masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def load_encoder(model_name: str, trust_remote_code: bool = False):
    """A frozen text encoder and its tokenizer, from a Hub id or a local folder."""
    from transformers import AutoModel

    source, tokenizer = hub.text_source_and_tokenizer(model_name, "exercise 1", trust_remote_code)
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with the end-of-text token (the mask hides it)
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, use_safetensors=None)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# The same features, faster: length-sorted batches on worker threads; int8 encoders
# ---------------------------------------------------------------------------------------------

# On CPU a batch holds at most this many (padded) tokens: small batches keep their activations in the CPU's
# cache, faster than the same texts in batches of eval_batch_size (bench/features.py measures it).
CPU_BATCH_TOKENS = 1024


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first: at most `batch_size` items and,
    when given, at most `max_tokens` padded tokens each (a single longer item still gets a batch)."""
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, start = [], 0
    while start < len(order):
        width = max(lengths[order[start]], 1)  # the batch's longest item comes first
        count = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // width))
        batches.append(order[start:start + count])
        start += count
    return batches


def extract_features(model, tokenizer, texts: list[str], pooling: str = "cls", max_length: int = 128,
                     batch_size: int = 64, device: str = "cpu", desc: str = "features",
                     precision: str = "no") -> np.ndarray:
    """embed_texts's features (the same to float rounding) for many texts, faster: embed_batch runs on batches of
    texts of similar length (sorted, longest first so an out-of-memory shows at once), so padding costs almost
    nothing. On CPU, batches also hold at most CPU_BATCH_TOKENS tokens and run in parallel on one worker thread
    per torch thread, each batch single-threaded: one batch's small matmuls and elementwise ops split poorly
    across cores, and single-threaded workers do not stall on each other when the machine is busy. A batch is
    made of the same texts whatever the thread count, so the features do not depend on it."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm.auto import tqdm

    # tokenized once, unpadded: the lengths sort the texts into batches, and each batch is padded from these ids
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    batches = length_batches([len(ids) for ids in encoded["input_ids"]], batch_size,
                             CPU_BATCH_TOKENS if device == "cpu" else None)
    model.eval().to(device)

    def embed(rows):
        batch = tokenizer.pad({key: [encoded[key][i] for i in rows] for key in ("input_ids", "attention_mask")},
                              padding=True, padding_side="right", return_tensors="pt")     # as embed_texts pads
        return rows, embed_batch(model, batch, pooling, device, precision)

    threads = torch.get_num_threads()
    workers = min(threads, len(batches)) if device == "cpu" else 1
    features = None
    workers_pool = ThreadPoolExecutor(max(workers, 1))
    progress = tqdm(total=len(batches), desc=desc, unit="batch")
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        for rows, pooled in workers_pool.map(embed, batches):
            if features is None:
                features = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            features[rows] = pooled
            progress.update()
    finally:
        workers_pool.shutdown(cancel_futures=True)  # an error or Ctrl-C does not wait for the queued batches
        torch.set_num_threads(threads)
        progress.close()
    return features


def quantize_encoder(model, quantize: str | None):
    """The model as it is (quantize=None), or a copy whose nn.Linear layers, all but the down-projections, run
    dynamic int8 on CPU (quantize="int8": weights int8 per output channel, activations quantized per batch)."""
    if quantize is None:
        return model
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch.ao.quantization and quantized tensors are deprecated in favour of torchao, which this project
        # does not install; quantize_dynamic still works in the pinned torch, and the warnings (a screenful
        # each) would bury the run's own output
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        # a scale per output channel, not one per layer: the features stay closer to fp32's at the same speed,
        # as one outlying channel no longer coarsens every other's steps (bench/int8.py compares them). Down-
        # projections (the feed-forward output, in > out features) stay fp32: they read GELU outputs, whose
        # outliers int8 clips worst
        spec = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module.in_features <= module.out_features}
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


# ---------------------------------------------------------------------------------------------
# Classic classifiers on the frozen features
# ---------------------------------------------------------------------------------------------

# libsvm's exact SVC fits in time growing faster than n^2 (one thread): quick at the course's size, far too slow
# at many times it. Above this many training texts svc_solver=auto approximates the kernel instead.
SVC_EXACT_MAX_ROWS = 10_000


def svc_solver(config: dict, rows: int) -> str:
    """"exact" or "approximate" for `rows` training texts: svc_solver as set, or what auto picks (with a note)."""
    if config["svc_solver"] != "auto":
        return config["svc_solver"]
    if rows <= SVC_EXACT_MAX_ROWS:
        return "exact"
    print(f"note: {rows:,} training texts is more than {SVC_EXACT_MAX_ROWS:,}, so svc_solver=auto fits the SVC "
          f"approximately (its {config['svc_kernel']} kernel mapped by Nystroem with {config['svc_components']} "
          f"components, then a linear SVM), in time linear in the texts; svc_solver=exact keeps libsvm's exact fit")
    return "approximate"


# Logistic regression's lbfgs stops once its gradient is this small, at the loss's one minimum, which the features
# alone decide; scikit-learn's default (1e-4) stops short of it, where the solver's path still shows in the predictions.
LOGREG_TOL = 1e-8


def make_classifier(kind: str, C: float, config: dict, solver: str = "exact", gamma: float | None = None):
    """The classifier of `kind` ("svc" or "logreg"), standardizing first when configured. An approximate SVC
    keeps the exact one's kernel and its gamma ("scale": 1 / (features x variance), given as `gamma`)."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    steps = [StandardScaler()] if config["standardize"] else []
    if kind == "svc" and solver == "approximate":
        if config["svc_kernel"] != "linear":
            steps.append(Nystroem(kernel=config["svc_kernel"], gamma=gamma, n_components=config["svc_components"],
                                  random_state=config["seed"]))
        steps.append(LinearSVC(C=C, random_state=config["seed"]))
    elif kind == "svc":
        steps.append(SVC(kernel=config["svc_kernel"], C=C, random_state=config["seed"]))
    else:
        steps.append(LogisticRegression(C=C, tol=LOGREG_TOL, max_iter=config["logreg_max_iter"],
                                        random_state=config["seed"]))
    return make_pipeline(*steps) if len(steps) > 1 else steps[0]


def fit_classifier(kind: str, config: dict, features: dict, labels: dict):
    """Fit one classifier on train; with tune_C, its C is the grid value best on validation. It sees the features
    as float64, as predict_scored does: in float32 lbfgs's gradient, a BLAS product, rounds differently with BLAS's
    thread count, and logistic regression ended elsewhere on another machine (libsvm computes in float64 anyway)."""
    grid = config["C_grid"] if config["tune_C"] else [config[f"{kind}_C"]]
    train, validation = (np.asarray(features[split], dtype=np.float64) for split in ("train", "validation"))
    solver = svc_solver(config, len(train)) if kind == "svc" else "exact"
    gamma = None
    if solver == "approximate":
        variance = (train - train.mean(0)) / train.std(0).clip(min=1e-12) if config["standardize"] else train
        gamma = 1.0 / (train.shape[1] * float(variance.var()))
    scores, best = {}, None
    for C in grid:
        make = lambda: make_classifier(kind, C, config, solver, gamma)
        exact_svc = kind == "svc" and solver == "exact" and len(train) > 5000   # the one fit that can run for long
        estimate = fit_seconds_estimate(make, train, labels["train"], config["seed"]) if exact_svc else None
        with utils.heartbeat(f"{kind}: fitting on {len(train):,} texts ({solver}, C={C})", len(train) > 5000, estimate):
            classifier = make().fit(train, labels["train"])
        scores[C] = float((classifier.predict(validation) == labels["validation"]).mean())
        if best is None or scores[C] > scores[best[0]]:
            best = (C, classifier)
    if len(grid) > 1:
        print(f"{kind}: validation accuracy by C {scores} -> C={best[0]}")
    return best[1], {"C": best[0], "solver": solver, "validation_accuracy_by_C": {str(C): s for C, s in scores.items()}}


def fit_seconds_estimate(make, features: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    """Seconds libsvm's exact fit on all rows should take, from a timed fit on a seeded tenth of them (at most
    2,000), its time growing about as n^2."""
    import time

    rows = np.random.default_rng(seed).choice(len(features), min(2000, len(features) // 10), replace=False)
    start = time.perf_counter()
    try:
        make().fit(features[rows], labels[rows])
    except ValueError:          # the subsample missed a rare class: no estimate
        return None
    return (time.perf_counter() - start) * (len(features) / len(rows)) ** 2


def predict_scored(classifier, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class ids and a score for each: logistic regression's probability of that class, an SVC's
    decision value for it (its margin from the boundary, in standardized feature units; larger = surer)."""
    features = np.asarray(features, dtype=np.float64)     # as fit_classifier fitted it
    if hasattr(classifier, "predict_proba"):
        predicted, probabilities = classifier.predict(features), classifier.predict_proba(features)
        return predicted, probabilities[np.arange(len(predicted)), np.searchsorted(classifier.classes_, predicted)]
    decision = classifier.decision_function(features)
    if decision.ndim == 1:  # two classes: one signed margin, > 0 the second class (one kernel pass, not predict's too)
        return classifier.classes_[(decision > 0).astype(int)], np.abs(decision)
    predicted = classifier.predict(features)  # an SVC's many classes vote one against one: its own predict
    return predicted, decision[np.arange(len(predicted)), np.searchsorted(classifier.classes_, predicted)]


if __name__ == "__main__":
    utils.run_cli(main)
