#!/usr/bin/env bash
# On the GPU box: build candidate extended models side by side (one process each on the one GPU), print their
# evaluations, and copy each candidate's weights to $OUT (the summary JSON too). Used once to choose the
# bundled extended model's recipe; the chosen command is recorded in its build_info.json and docs/tiny-model.md.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/ext
run() { name=$1; shift; python3 scripts/build_extended_model.py --device cuda --out /tmp/ext/$name "$@" \
  > /tmp/ext/$name.log 2>&1 || echo "$name failed: $(tail -3 /tmp/ext/$name.log)"; }
# one candidate per argument: "NAME --flag value ...", e.g. "A --steps 1000 --passkey-min 512"
for spec in "$@"; do run $spec & done
wait
python3 - <<'PY'
import json, os, shutil
from pathlib import Path
out = Path(os.environ["OUT"]); rows = {}
for folder in sorted(Path("/tmp/ext").iterdir()):
    info = folder / "build_info.json"
    if not info.exists():
        continue
    data = json.loads(info.read_text()); rows[folder.name] = data
    shutil.copy(folder / "model.safetensors", out / f"{folder.name}.safetensors")
    models = data["report"]["models"]
    print(folder.name, data["args"]["steps"], data["args"]["passkey_min"], data["args"]["lr"], data["train_seconds"],
          {m: ({k: round(v, 3) for k, v in r["ppl"].items()}, r["passkey"]) for m, r in models.items()})
shutil.copy(next(Path("/tmp/ext").glob("*/config.json")), out / "config.json")
(out / "candidates.json").write_text(json.dumps(rows, indent=1))
PY
