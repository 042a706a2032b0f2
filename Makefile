# mmalign: `make demo` trains a real speech-LLM offline; `make test` runs the test suite.
# Both set up .venv first (the exact stack in requirements.lock) and Debian's synthesisers, sox,
# ffmpeg and offline English text (fortunes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mmalign-installed
DEMO   ?= runs/demo
DEMO_CONFIG ?= configs/demo/whisper-tiny_smollm2-135m.yaml
ST     ?= runs/st_demo
ST_CONFIG ?= configs/demo/st_whisper-tiny_smollm2-135m.yaml
SENT   ?= runs/sentences
SENT_CONFIG ?= configs/demo/sentences_whisper-tiny_smollm2-135m.yaml
AVSR   ?= runs/avsr_demo
AVSR_CONFIG ?= configs/demo/avsr_whisper-tiny+vit-lips_smollm2-135m.yaml
APT_PACKAGES := espeak-ng sox ffmpeg flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts fortunes fortunes-min

LOCKS  := requirements.lock requirements-nodeps.lock
UV_PIN := uv==0.13.9
UPGRADE ?=

.PHONY: setup system-deps check-stack lock test demo demo-sentences demo-avsr demo-st lint format bench perf-doc clean

setup: $(STAMP)

# Everything comes from the locks (exact versions, sha256-checked); a changed lock re-runs this.
# system-deps first: the stack check loads torchcodec, which needs the system's FFmpeg.
$(STAMP): $(LOCKS) pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-nodeps.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m mmalign.stack
	touch $(STAMP)

# Fails with the package and versions when a compiled piece does not load beside this torch.
check-stack:
	$(BIN)/python -m mmalign.stack

# Re-resolve pyproject.toml's ranges into the locks (keeps current pins where they still fit;
# `make lock UPGRADE=1` moves everything to the newest allowed), then run `make test`.
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -q "$(UV_PIN)"; }
	$(BIN)/uv pip compile -q pyproject.toml --extra dev --extra demo --extra decode --universal \
	  --generate-hashes $(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" -o requirements.lock
	$(BIN)/uv pip compile -q requirements-nodeps.in --no-deps --universal \
	  --generate-hashes $(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" -o requirements-nodeps.lock

system-deps:
	@missing=""; for p in espeak-ng sox ffmpeg flite text2wave; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	test -f /usr/share/games/fortunes/fortunes || missing="$$missing fortunes"; \
	echo '(voice_cmu_us_slt_arctic_hts)' | festival -i 2>&1 | grep -q 'SIOD ERROR' && missing="$$missing festvox"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	  else echo "missing:$$missing -- run: sudo apt-get install -y $(APT_PACKAGES)"; fi; \
	fi

test: setup
	$(BIN)/python -m pytest tests

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache

format:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

demo: setup
	$(BIN)/mmalign synth $(DEMO)/corpus --kind digits --n_train 1600 --n_val 32 --n_test 100
	$(BIN)/mmalign prepare $(DEMO)/corpus/train.jsonl $(DEMO)/shards/train
	$(BIN)/mmalign prepare $(DEMO)/corpus/val.jsonl $(DEMO)/shards/val
	$(BIN)/mmalign prepare $(DEMO)/corpus/test.jsonl $(DEMO)/shards/test
	$(BIN)/mmalign test --config $(DEMO_CONFIG) --model.predictions_dir $(DEMO)/before
	$(BIN)/mmalign fit --config $(DEMO_CONFIG)
	$(BIN)/mmalign test --config $(DEMO_CONFIG) --ckpt_path $(DEMO)/checkpoints/last.ckpt --model.predictions_dir $(DEMO)/after
	$(BIN)/mmalign export $(DEMO)/checkpoints/last.ckpt $(DEMO)/export
	@echo "== held-out WER (unseen voices), per digit =="
	$(BIN)/mmalign score $(DEMO)/before/utterances.jsonl $(DEMO)/after/utterances.jsonl --normalizer basic --examples 5
	@echo "== the same with Whisper's English normaliser (each digit string becomes one number) =="
	$(BIN)/mmalign score $(DEMO)/after/utterances.jsonl --normalizer english
	@echo "exported model: $(DEMO)/export   metrics: $(DEMO)/before $(DEMO)/after"

# Open vocabulary: about 12,000 English sentences spoken by espeak-ng and flite (festival held out
# as test_synth); CTC alignment stage, then the LLM loss; WER before/after on both test splits.
demo-sentences: setup
	$(BIN)/mmalign synth $(SENT)/corpus --kind sentences --n_train 20000 --n_val 200 --n_test 200
	for s in train val test test_synth; do $(BIN)/mmalign prepare $(SENT)/corpus/$$s.jsonl $(SENT)/shards/$$s || exit 1; done
	$(BIN)/mmalign test --config $(SENT_CONFIG) --model.predictions_dir $(SENT)/before
	$(BIN)/mmalign fit --config $(SENT_CONFIG)
	for s in test test_synth; do $(BIN)/mmalign test --config $(SENT_CONFIG) --ckpt_path $(SENT)/checkpoints/last.ckpt --data.test $(SENT)/shards/$$s --model.predictions_dir $(SENT)/after_$$s || exit 1; done
	$(BIN)/mmalign export $(SENT)/checkpoints/last.ckpt $(SENT)/export
	@echo "== held-out WER: unseen sentences and voices (espeak-ng, flite) =="
	$(BIN)/mmalign score $(SENT)/before/utterances.jsonl $(SENT)/after_test/utterances.jsonl --normalizer english --examples 5
	@echo "== unseen sentences, unseen synthesiser (festival) =="
	$(BIN)/mmalign score $(SENT)/after_test_synth/utterances.jsonl --normalizer english --examples 5
	@echo "exported model: $(SENT)/export   metrics: $(SENT)/before $(SENT)/after_test $(SENT)/after_test_synth"

# Audio-visual: synthetic lips corpus, one model for ASR/VSR/AVSR, scored under babble noise.
demo-avsr: setup
	$(BIN)/mmalign synth $(AVSR)/corpus --video true --kind digits --n_train 2000 --n_val 32 --n_test 100
	$(BIN)/mmalign prepare $(AVSR)/corpus/train.jsonl $(AVSR)/shards/train
	$(BIN)/mmalign prepare $(AVSR)/corpus/val.jsonl $(AVSR)/shards/val
	$(BIN)/mmalign prepare $(AVSR)/corpus/test.jsonl $(AVSR)/shards/test
	$(BIN)/mmalign fit --config $(AVSR_CONFIG)
	$(BIN)/mmalign evaluate $(AVSR)/checkpoints/last.ckpt $(AVSR)/shards/test --out $(AVSR)/eval --as-tasks asr vsr avsr --snr clean 5 0 -5 --normalizer basic

# Speech translation + ASR in one model: English speech, German targets from gettext catalogs,
# trained in two curriculum stages (ASR, then ASR + ST); BLEU/chrF and WER before and after.
demo-st: setup
	$(BIN)/mmalign synth $(ST)/corpus --kind translation --n_train 1500 --n_val 32 --n_test 100
	$(BIN)/mmalign prepare $(ST)/corpus/train.jsonl $(ST)/shards/train
	$(BIN)/mmalign prepare $(ST)/corpus/val.jsonl $(ST)/shards/val
	$(BIN)/mmalign prepare $(ST)/corpus/test.jsonl $(ST)/shards/test
	$(BIN)/mmalign test --config $(ST_CONFIG) --model.predictions_dir $(ST)/before
	$(BIN)/mmalign curriculum configs/demo/st_curriculum.yaml
	$(BIN)/mmalign test --config $(ST_CONFIG) --ckpt_path $(ST)/curriculum/1-multitask/checkpoints/last.ckpt --model.predictions_dir $(ST)/after
	@echo "== before ==" && cat $(ST)/before/test_metrics.json
	@echo "== after ==" && cat $(ST)/after/test_metrics.json

bench: setup
	$(BIN)/python bench/encoder_window.py --threads 1
	$(BIN)/python bench/projectors.py
	$(BIN)/python bench/transcribe_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/perf_doc.py

perf-doc: setup
	$(BIN)/python bench/perf_doc.py

clean:
	rm -rf runs lightning_logs .pytest_cache
