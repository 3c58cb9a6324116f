# strokekit — two commands do everything (each creates .venv and installs what it needs):
#   make run    generate the phantom and execute every notebook (quick profile) into build/
#   make test   ruff (make lint), unit tests, the JAX-backend pass, every notebook under nbval, and the
#               full profile's code paths at tiny sizes (make test-smoke)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= quick
EXTRAS ?= tf,jax,notebooks,dev
export STROKEKIT_PROFILE ?= $(PROFILE)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_ENABLE_ONEDNN_OPTS ?= 1
export PYTHONHASHSEED ?= 0
export MPLBACKEND ?= Agg

.PHONY: install run lint test test-unit test-jax test-cross-a test-cross-b test-notebooks test-smoke full-profile lab app notebooks benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else "strokekit needs Python 3.10-3.12, found %d.%d (set PYTHON=python3.X)" % v)'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

run: install
	$(PY) -m strokekit phantom --out data/phantom
	$(PY) -m strokekit run-notebooks --out build/notebooks --parallel

# `make test` runs two things at a time (on the 2-core development machine, 2026-12-05: 22.6 min against
# 25.9 min one after the other): the unit tests beside the JAX pass (separate processes, every file under
# tmp_path), then two crossed streams of notebooks, the quick chain A followed by the smoke chain B beside
# the quick chain B followed by the smoke chain A (the smoke profile has its own data and runs, see
# test-smoke), then the app notebook in both profiles. Both jobs print as they go, line by line (pytest's
# progress lines show which chain is where). `make test-notebooks` and `make test-smoke` run each profile alone.
NBVAL = $(PY) -m pytest $(NBVAL_OPTS)
test: install
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory -j2 --output-sync=line test-unit test-jax
	@mkdir -p build/smoke
	$(MAKE) --no-print-directory -j2 --output-sync=line test-cross-a test-cross-b
	$(NBVAL) $(NBVAL_AFTER)
	$(SMOKE_ENV) $(NBVAL) $(NBVAL_AFTER)

test-cross-a: install
	$(NBVAL) $(NBVAL_A)
	$(SMOKE_ENV) $(NBVAL) $(NBVAL_B)

test-cross-b: install
	$(NBVAL) $(NBVAL_B)
	$(SMOKE_ENV) $(NBVAL) $(NBVAL_A)

# Style and import checks of the package, tests, tools and the notebooks' .py twins ([tool.ruff] in pyproject.toml).
lint: install
	$(PY) -m ruff check .

test-unit: install
	$(PY) -m pytest tests -q --durations=12

# Models, losses, metrics, augmentation and training again under the JAX backend. XLA's
# optimiser spends 10-20 s per new shape on a small CPU; level 0 keeps this pass to minutes.
test-jax: install
	XLA_FLAGS=--xla_backend_optimization_level=0 KERAS_BACKEND=jax $(PY) -m pytest tests -q -m "backend and not slow" -p no:cacheprovider

# Notebooks validated in CI in two chains that run at the same time (most of a quick notebook is
# single-threaded Python, so two share the 2 cores of a small machine well); the same chains as `make run`
# (strokekit.runner.CHAINS, kept equal by a test). Notebooks that hand files to each other share a chain:
# 02 saves the course split that 04, 06 and 09 read, and 06 evaluates the runs of 04 and 05. 03 and 08
# need nothing and end chain A so the two chains take about as long. Chain B
# only reads the CT-ICH slices or (07) the course split, which is saved atomically. The app notebook lists
# every run folder, so it runs after both.
# `make test-notebooks NBVAL_B= NBVAL_AFTER= NBVAL_A=notebooks` runs every notebook in one chain.
NBVAL_A ?= notebooks/01_preprocessing.ipynb notebooks/02_cluster_split.ipynb notebooks/04_unet_vs_resunet.ipynb \
	notebooks/05_transfer_learning.ipynb notebooks/06_evaluation.ipynb notebooks/09_3d_reconstruction.ipynb \
	notebooks/03_augmentation.ipynb notebooks/08_ctp_core_penumbra.ipynb
NBVAL_B ?= notebooks/07_multiclass.ipynb notebooks/10_what_generalizes.ipynb
NBVAL_AFTER ?= notebooks/app.ipynb
NBVAL_LOG ?= build/nbval-b.log
NBVAL_OPTS = --nbval-lax --nbval-cell-timeout=900 -q -p no:cacheprovider --durations=12
test-notebooks: install
	@mkdir -p build; status=0; \
	if [ -n "$(strip $(NBVAL_B))" ]; then \
	  echo "nbval, chain B in the background: $(NBVAL_B)"; \
	  $(PY) -m pytest $(NBVAL_OPTS) $(NBVAL_B) > $(NBVAL_LOG) 2>&1 & pid=$$!; fi; \
	echo "nbval, chain A: $(NBVAL_A)"; \
	$(PY) -m pytest $(NBVAL_OPTS) $(NBVAL_A) || status=1; \
	if [ -n "$(strip $(NBVAL_B))" ]; then \
	  wait $$pid || status=1; echo "nbval, chain B:"; cat $(NBVAL_LOG); fi; \
	test $$status = 0
	$(if $(strip $(NBVAL_AFTER)),$(PY) -m pytest $(NBVAL_OPTS) $(NBVAL_AFTER))

# The full profile's code paths at tiny sizes (profile "smoke": 32 px, 1 epoch, 1 seed, a 5-level
# U-Net of 4-64 filters): every cell that only a GPU class would run (the study's 5-level U-Net grid,
# the VGG16 U-Net, CT-ICH pretraining, the few-shot default, ...) is executed in CI. Its runs and
# derived data go to build/smoke, never mixed with the course's.
SMOKE_ENV = STROKEKIT_PROFILE=smoke STROKEKIT_RUNS=$(CURDIR)/build/smoke/runs STROKEKIT_DATA=$(CURDIR)/build/smoke/data
test-smoke: install
	@mkdir -p build/smoke
	$(SMOKE_ENV) $(MAKE) --no-print-directory test-notebooks NBVAL_LOG=build/smoke/nbval-b.log

# The real full profile of every notebook, for a GPU machine, under JAX: each notebook's time, status
# and headline figures go to benchmarks/full_profile.json (the summary of build/full-profile).
full-profile: install
	@status=0; KERAS_BACKEND=jax STROKEKIT_PROFILE=full $(PY) -m strokekit run-notebooks --out build/full-profile \
	  --timeout 14400 || status=$$?; \
	cp build/full-profile/summary.json benchmarks/full_profile.json && echo "wrote benchmarks/full_profile.json"; \
	exit $$status

lab: install
	$(PY) -m jupyter lab notebooks

# The upload-and-segment dashboard on http://127.0.0.1:8866 (Ctrl-C stops it).
app: install
	VENV=$(VENV) bash tools/serve_app.sh

# Rebuild the .ipynb files from their py:percent twins (the twins are what you edit).
notebooks: install
	$(PY) -m jupytext --to ipynb --update notebooks/[0-9][0-9]_*.py notebooks/app.py

benchmark: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build runs data/phantom .pytest_cache
