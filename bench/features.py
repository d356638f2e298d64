"""Exercise 1's feature extractor vs the course's `pipeline("feature-extraction")`.

Both sides embed the same Rotten Tomatoes sentences with the same encoder in this process and
must agree (allclose). Sentences/s and the speedup come from `--repeats` rounds that alternate the
two sides; the median round counts. Efficiency is the extractor's useful FLOP/s (matmul FLOPs on the
real, unpadded token counts; end-to-end time including tokenization) divided by an fp32
square-matmul FLOP/s measured right before and after it, in the same round.

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


def main() -> None:
    parser = common.parser(__doc__, "rotten_tomatoes")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--pooling", default="cls", choices=("cls", "mean"))
    parser.add_argument("--batch-size", type=int, default=exercise_1.CONFIG["eval_batch_size"])
    parser.add_argument("--max-length", type=int, default=exercise_1.CONFIG["max_length"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both sides; the median round counts")
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
    efficiency = common.median(flops / r["ours_s"] / r["matmul_flops_per_s"] for r in rounds)
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
        "efficiency": round(efficiency, 3),
        "per_round": [{"speedup": round(r["theirs_s"] / r["ours_s"], 2),
                       "efficiency": round(flops / r["ours_s"] / r["matmul_flops_per_s"], 3)} for r in rounds],
        "targets": {"speedup": 3.0, "efficiency": 0.75},
        "met": speedup >= 3.0 and efficiency >= 0.75,
    }, args.results_file)


if __name__ == "__main__":
    main()
