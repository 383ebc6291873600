# The two commands the README opens with:
#   make run    set up this checkout, then run the appliance on embedded defaults
#   make test   set up this checkout, then run the whole test suite (what CI runs)
# Both start with scripts/bootstrap.sh, which is idempotent and quick once done.

VENV        := .venv
PY          := $(VENV)/bin/python
APPLIANCE   ?= ./var/appliance

.PHONY: run test test-fast lint bench bench-api bench-transfer bench-mount bench-sync bench-sync-100k bench-compare bench-peers bootstrap clean-run

bootstrap:
	@bash scripts/bootstrap.sh

run: bootstrap
	@if [ ! -e "$(APPLIANCE)/config.toml" ]; then \
		$(VENV)/bin/cairnd init --home "$(APPLIANCE)" --no-serve-hint; \
	fi
	@exec $(VENV)/bin/cairnd serve --home "$(APPLIANCE)" --next-steps

# pytest exits 5 when it collected no test; that must fail the build, and it does here
# because any non-zero exit fails make. The suite runs in TEST_WORKERS processes
# (pytest-xdist), each test file whole in one of them (its module fixtures start once);
# much of its time is waiting on real processes, so two overlap well even on two cores.
# TEST_WORKERS=0 runs it in this process, serially. tests/README.md has the rest.
TEST_WORKERS ?= 2
PYTEST      := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: bootstrap
	@$(VENV)/bin/lint-imports --no-cache
	@$(PYTEST)

# Everything but the tests marked slow: for the edit-test loop. CI runs `make test`.
test-fast: bootstrap
	@$(PYTEST) -m "not slow"

# ruff, mypy (strict; the packages, then the bench scripts), and the import contracts in
# pyproject.toml ([tool.importlinter]).
lint: bootstrap
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/mypy bench/*.py
	@$(VENV)/bin/lint-imports --no-cache

bench: bootstrap
	@$(PY) bench/blockstore.py

bench-api: bootstrap
	@$(PY) bench/api.py

bench-transfer: bootstrap
	@$(PY) bench/transfer.py

# The drive (cairn mount) against cairn get/put, the local disk and rclone mount of a local
# folder, in one run (~4 minutes; rclone is installed from Debian when missing; run as
# root). --quick and the other options: bench/mount.py --help.
bench-mount: bootstrap
	@$(PY) bench/mount.py

bench-sync: bootstrap
	@$(PY) bench/sync.py

# The issue-11 figures with 100,000 files synced (edit propagation, agents' memory).
bench-sync-100k: bootstrap
	@$(PY) bench/sync.py --files 100000 --phases many,edits

# Cairn and Syncthing side by side (issue 12): 10,000 and 100,000 small files, edits among
# them, a near-empty edit and a 1 GiB file, each system alone (~30 minutes; Syncthing is
# installed from Debian when missing). --quick and the other options: bench/compare.py --help.
bench-compare: bootstrap
	@$(PY) bench/compare.py

# LAN peers (issue 15): device B fetches a 1 GiB file device A has, from a 100 Mbit/s
# appliance alone and with A as a peer, in network namespaces (~5 minutes; run as root).
# --size-gib, --rate: bench/peers.py --help.
bench-peers: bootstrap
	@$(PY) bench/peers.py

# Remove the embedded-defaults appliance made by `make run` (its blocks too).
clean-run:
	rm -rf "$(APPLIANCE)"
