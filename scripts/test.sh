#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: unit, contract and integration tests against the
# real local stack (Tansu broker, embedded Milvus, MiniLM, dev TGI servers with SmolLM2).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
