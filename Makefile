# The two commands of the README:  make example   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
EX := examples/camvid

.PHONY: setup example test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build (a wheel on local disk here); an unpinned torch pulls CUDA.
# constraints.txt: the versions the suite was last run with (reproducible set-up).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Full DHR, the base masks (Table 6 row 1) for comparison, then the score of DHR against them.
example: setup
	$(VENV)/bin/dhr-label refine --cams $(EX)/cams.h5 --feats $(EX)/feats.h5 --classes camvid --out $(EX)/out/masks
	$(VENV)/bin/dhr-label refine --cams $(EX)/cams.h5 --row 1 --out $(EX)/out/base
	$(VENV)/bin/dhr-label score --pred $(EX)/out/masks --gt $(EX)/gt --compare $(EX)/out/base

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(EX)/out .pytest_cache
