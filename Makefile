# Two commands on a fresh machine:
#   make demo   - set up .venv, make a small GPT-2, convert it, print `sphere info`, read an expert back
#   make test   - set up .venv, run the static checks (ruff, mypy) and the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spherefmt-installed

.PHONY: setup system-deps js-deps bench-deps demo check test fuzz bench clean

setup: $(STAMP) system-deps js-deps

# Debian tools the tests check our files against (qemu-img, fsck.vfat, mtools, libguestfs);
# installed when missing and running as root (CI), otherwise named.
system-deps:
	@bash .ci/system-deps.sh

# zarrita.js, the JavaScript Zarr reader the portability tests read packages with (pinned by its lock file)
js-deps: system-deps
	@if command -v npm >/dev/null && [ ! -d tests/js/node_modules ]; then npm ci --prefix tests/js --no-audit --no-fund --silent; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so the torch extra resolves to it (not a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# (setuptools warns on every editable install that a folder named like the package could shadow it)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[torch,dev,vhd,hf,bench,viz,vulkan,s3,gguf,fast]'
	touch $(STAMP)

demo: setup
	$(PY) -m spherefmt.demo --out demo-out

# static checks: ruff (pyflakes, pycodestyle, bugbear, isort, pyupgrade) and mypy
check: setup
	$(VENV)/bin/ruff check spherefmt backends runtime tests bench
	PYTHON=$(abspath $(PY)) .ci/typecheck.sh

# seeded mutation fuzzing of every parser and container (the suite runs 40 cases per target)
fuzz: setup
	$(PY) -m spherefmt.testing.fuzz --cases 2000

# the suite on both cores (pytest-xdist; an idle worker steals queued tests: durations are uneven),
# in a shuffled order (pytest-randomly) whose seed is printed first: `SEED=N make test` repeats it
test: setup check
	@seed=$${SEED:-$$($(PY) -c 'import random; print(random.randrange(1 << 32))')}; \
	echo "test order: shuffled, seed $$seed (SEED=$$seed make test repeats it)"; \
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --randomly-seed=$$seed

# llama.cpp for bench/bench_decode.py: llama-cpp-python built from its sdist (several minutes, once)
bench-deps: setup
	@[ -x bench/.venv-llama/bin/python ] || { $(PYTHON) -m venv bench/.venv-llama && \
	  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" bench/.venv-llama/bin/pip install -q \
	  --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy; }

bench: setup bench-deps
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_format.py
	$(PY) bench/bench_vhd.py
	$(PY) bench/bench_runtime.py
	$(PY) bench/bench_backends.py
	$(PY) bench/bench_moe.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_gguf.py
	$(PY) bench/bench_s3.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_reliability.py

clean:
	rm -rf demo-out build dist *.egg-info
