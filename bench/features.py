"""Exercise 1's feature extractor vs the course's `pipeline("feature-extraction")`.

Both sides embed the same Rotten Tomatoes sentences with the same encoder in this process and
must agree (allclose). Sentences/s and the speedup come from `--repeats` rounds that alternate the
two sides; the median round counts. Efficiency is the extractor's useful FLOP/s (matmul FLOPs on the
real, unpadded token counts; end-to-end time including tokenization) divided by an fp32
square-matmul FLOP/s measured right before and after it, in the same round.

The peer: sentence-transformers' `SentenceTransformer(<model>).encode`, what users of all-MiniLM-L6-v2
reach for, with its defaults (batch 32, the model's own modules: mean pooling, then Normalize for MiniLM).
Our extractor runs mean-pooled against it (whatever --pooling is), alternating rounds as above; the
ratio is their seconds / ours (goal >= 1: keep ahead of it), and the cosine between each text's two
vectors (the minimum over texts) says they are the same features up to normalisation.

    python -m bench.features                          # real MiniLM, 1000 sentences
    python -m bench.features --smoke --model <folder> # a few seconds, any small encoder
"""
from __future__ import annotations

import numpy as np

from bench import common

common.offline_env()
import data  # noqa: E402
import exercise_1  # noqa: E402


def pipeline_features(model_name: str, texts: list[str], pooling: str, max_length: int) -> np.ndarray:
    """What the course does: one pipeline call over the sentences, then pool each nested list."""
    from transformers import pipeline

    extractor = pipeline("feature-extraction", model=model_name, device="cpu",
                         tokenize_kwargs={"truncation": True, "max_length": max_length})
    outputs = extractor(texts)  # one [1, tokens, hidden] nested list per sentence
    if pooling == "cls":
        return np.array([output[0][0] for output in outputs], dtype=np.float32)
    return np.array([np.mean(output[0], axis=0) for output in outputs], dtype=np.float32)


def load_peer(model_name: str):
    """sentence-transformers' SentenceTransformer on the model folder, on the CPU, as its users load it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_name, device="cpu")


def peer_features(peer, texts: list[str]) -> np.ndarray:
    """What a sentence-transformers user runs: `encode` with its defaults (batch 32, its modules' pooling and
    normalisation, its own max_seq_length)."""
    return peer.encode(texts, convert_to_numpy=True)


def cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Each row's cosine similarity between the two feature sets."""
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    return (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)).clip(min=1e-12)


def compare_with_peer(model, tokenizer, model_name: str, texts: list[str], max_length: int, batch_size: int,
                      repeats: int) -> dict:
    """Our mean-pooled extraction vs sentence-transformers' encode on the same texts: rounds, speed ratio,
    cosines. A model sentence-transformers cannot load gives {"skipped": why}."""
    import sentence_transformers

    try:
        peer = load_peer(model_name)
    except Exception as error:  # noqa: BLE001 - any failure of the optional peer is reported, not fatal
        return {"skipped": f"sentence-transformers cannot load {model_name}: {type(error).__name__}: {error}"}

    def ours():
        return exercise_1.extract_features(model, tokenizer, texts, "mean", max_length, batch_size, "cpu",
                                           desc="bench features (mean)")

    exercise_1.extract_features(model, tokenizer, texts[:32], "mean", max_length, batch_size, "cpu")  # warm-up
    peer_features(peer, texts[:32])
    rounds, our_features, their_features = common.paired_rounds(ours, lambda: peer_features(peer, texts), repeats)
    similarity = cosines(our_features, their_features)
    modules = [type(module).__name__ for module in peer]
    return {"library": f"sentence-transformers {sentence_transformers.__version__}", "modules": modules,
            "batch_size": 32, "max_seq_length": peer.max_seq_length, "normalizes": "Normalize" in modules,
            "ours_pooling": "mean", "rounds": len(rounds),
            "ours_sentences_per_s": round(common.median(len(texts) / r["ours_s"] for r in rounds), 1),
            "peer_sentences_per_s": round(common.median(len(texts) / r["theirs_s"] for r in rounds), 1),
            "speed_ratio": round(common.median(r["theirs_s"] / r["ours_s"] for r in rounds), 2),
            "per_round_speed_ratio": [round(r["theirs_s"] / r["ours_s"], 2) for r in rounds],
            "cosine_min": float(similarity.min()), "cosine_median": float(np.median(similarity))}


# aten ops by what they do; an op's self time counts once, under the first group whose word its name holds
OP_GROUPS = (("matmul", ("addmm", "aten::mm", "bmm", "linear", "matmul")), ("attention", ("scaled_dot_product",)),
             ("layer_norm", ("layer_norm",)), ("gelu", ("gelu",)), ("softmax", ("softmax",)))


def profile_breakdown(model, tokenizer, texts: list[str], pooling: str, max_length: int, batch_size: int) -> dict:
    """Shares of one extraction's wall time: aten ops by group (self CPU time), tokenization, and the rest
    (each batch's tokenizing and padding, pooling, Python and dispatch between ops, profiler overhead). The
    batches are exercise 1's (its tokenizer call for the lengths, length_batches, embed_texts), run one after
    another in this thread, single-threaded: the profiler does not see the extractor's worker threads, and each
    of them runs one batch single-threaded too, so the shares are the timed run's."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler, torch.inference_mode():
            start = time.perf_counter()
            encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            tokenize = time.perf_counter() - start
            for rows in exercise_1.length_batches([len(ids) for ids in encoded], batch_size, exercise_1.CPU_BATCH_TOKENS):
                exercise_1.embed_texts(model, tokenizer, [texts[i] for i in rows], pooling, max_length, len(rows))
            wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    seconds = dict.fromkeys([name for name, _ in OP_GROUPS] + ["other_ops"], 0.0)
    for event in profiler.key_averages():
        group = next((name for name, words in OP_GROUPS if any(word in event.key for word in words)), "other_ops")
        seconds[group] += event.self_cpu_time_total / 1e6
    seconds["tokenize"] = tokenize
    seconds["python_and_dispatch"] = max(wall - sum(seconds.values()), 0.0)
    return {"wall_s": round(wall, 2), **{name: round(value / wall, 3) for name, value in seconds.items()}}


def main() -> None:
    parser = common.parser(__doc__, "rotten_tomatoes")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--pooling", default="cls", choices=("cls", "mean"))
    parser.add_argument("--batch-size", type=int, default=exercise_1.CONFIG["eval_batch_size"])
    parser.add_argument("--max-length", type=int, default=exercise_1.CONFIG["max_length"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both sides; the median round counts")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one extraction: shares of its time by op group (torch.profiler)")
    parser.add_argument("--no-peer", action="store_true", help="leave out the sentence-transformers comparison")
    args = common.parse_args(parser, "tiny run: 32 sentences, one repeat, small matmul", common.minilm)
    n = 32 if args.smoke else args.sentences
    args.repeats = 1 if args.smoke else args.repeats
    matmul_size = 256 if args.smoke else 2048

    texts = list(data.load_text_dataset(args.dataset, seed=0, max_train_samples=n)["train"]["text"])
    model, tokenizer = exercise_1.load_encoder(args.model)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]

    def extract():
        return exercise_1.extract_features(model, tokenizer, texts, args.pooling, args.max_length, args.batch_size,
                                      "cpu", desc="bench features")

    def course():
        return pipeline_features(args.model, texts, args.pooling, args.max_length)

    # warm-up on the same few sentences: imports, thread pools, first allocations
    exercise_1.extract_features(model, tokenizer, texts[:32], args.pooling, args.max_length, args.batch_size, "cpu")
    pipeline_features(args.model, texts[:32], args.pooling, args.max_length)
    rounds, ours, theirs = common.paired_rounds(extract, course, args.repeats, matmul_size)

    flops = common.forward_flops(model, lengths)
    speedup = common.median(r["theirs_s"] / r["ours_s"] for r in rounds)
    efficiencies = [flops / r["ours_s"] / r["matmul_flops_per_s"] for r in rounds]
    efficiency = common.median(efficiencies)
    peer = ({"skipped": "--no-peer"} if args.no_peer else
            compare_with_peer(model, tokenizer, args.model, texts, args.max_length, args.batch_size, args.repeats))
    peer_ratio = peer.get("speed_ratio")
    targets = {"speedup": 3.0, "efficiency": 0.8, **({"peer_speed_ratio": 1.0} if peer_ratio is not None else {})}
    common.emit({
        "bench": "features", "model": args.model, "sentences": len(texts), "tokens": int(sum(lengths)),
        "pooling": args.pooling, "batch_size": args.batch_size, "rounds": len(rounds),
        "same_features": bool(np.allclose(ours, theirs, rtol=1e-4, atol=1e-5)),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "extractor_sentences_per_s": round(common.median(len(texts) / r["ours_s"] for r in rounds), 1),
        "pipeline_sentences_per_s": round(common.median(len(texts) / r["theirs_s"] for r in rounds), 1),
        "speedup": round(speedup, 2),
        "model_gflop_per_s": round(common.median(flops / r["ours_s"] for r in rounds) / 1e9, 2),
        "matmul_gflop_per_s": round(common.median(r["matmul_flops_per_s"] for r in rounds) / 1e9, 2),
        "efficiency": common.significant(efficiency),
        "per_round": [{"speedup": round(r["theirs_s"] / r["ours_s"], 2),
                       "efficiency": common.significant(flops / r["ours_s"] / r["matmul_flops_per_s"])} for r in rounds],
        "efficiency_spread": [common.significant(min(efficiencies)), common.significant(max(efficiencies))],
        **({"profile": profile_breakdown(model, tokenizer, texts, args.pooling, args.max_length, args.batch_size)} if args.profile else {}),
        # sentence-transformers' encode on the same texts: their seconds / ours, and the features' cosines
        "peer": peer, **({"peer_speed_ratio": peer_ratio, "peer_cosine_min": peer["cosine_min"]} if peer_ratio is not None else {}),
        "ratios": ["speedup", "efficiency", *(["peer_speed_ratio", "peer_cosine_min"] if peer_ratio is not None else [])],
        "targets": targets,
        "met": speedup >= 3.0 and efficiency >= 0.8 and (peer_ratio is None or peer_ratio >= 1.0),
    }, args.results_file)


if __name__ == "__main__":
    main()
