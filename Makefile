# Two commands on a fresh machine:
#   make demo   - set up .venv, make a small GPT-2, convert it, print `sphere info`, read an expert back
#   make test   - set up .venv and run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spherefmt-installed

.PHONY: setup system-deps demo test bench clean

setup: $(STAMP) system-deps

# Debian tools the tests check our files against (qemu-img reads and writes VHD); installed
# when missing and running as root (CI), otherwise named.
SYSTEM_TOOLS := qemu-img:qemu-utils fsck.vfat:dosfstools mcopy:mtools
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; fi; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so the torch extra resolves to it (not a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,dev,vhd]'
	touch $(STAMP)

demo: setup
	$(PY) -m spherefmt.demo --out demo-out

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) bench/bench_format.py

clean:
	rm -rf demo-out build dist *.egg-info
