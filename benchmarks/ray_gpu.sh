#!/usr/bin/env bash
# The restore job on a GPU as users run it: a local Ray head with token auth, a real `mlflow server` on
# 127.0.0.1, `ray job submit --working-dir .` of `linearard restore` with `ray.use_gpu: true` (one GPU worker).
#   1. the bundled default, a worker killed once mid-run (resume), registered, loaded back with from_pretrained;
#   2. a 7B-wide model (Llama-2-7B layer shapes, 2 layers, random weights written to disk), a short run, and
#      the plain-process benchmarks/ard_step.py on the same shape in the same call (the Ray overhead).
# Results go to $OUT (the job logs, results JSON). Needs ray[default,train,data] and mlflow importable
# (PYTHONPATH) and `ray` on PATH. The box has neither and no network: build the wheels here once with
# `python benchmarks/gpu_wheels.py` (.whl/wheels.tar.xz, 36.3 MiB: ~50 MiB with the checkout, of the 64 a call),
# then the `run` call carries [".whl"] and its command begins
#  [ -d .site/ray ] || python3 benchmarks/gpu_wheels.py --install .site || exit; export PYTHONPATH=$PWD/.site PATH=$PWD/.site/bin:$PATH;
#  bash benchmarks/ray_gpu.sh
# (benchmarks/results/README.md, "Ray and MLflow on the GPU box").
# Rehearsed on a CPU machine first (same commands, no GPU: a short default run, a narrow "wide" model, no ard_step):
#  USE_GPU=false FAIL_AT=8 DEFAULT_EXTRA="--train.steps 16 --train.checkpoint_every 4" WIDE_DIMS="128 256 4" \
#    PARTS="default wide-eager" PATH=.venv/bin:$PATH PY=python bash benchmarks/ray_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ray_gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
USE_GPU=${USE_GPU:-true} FAIL_AT=${FAIL_AT:-120} DEFAULT_EXTRA=${DEFAULT_EXTRA:-}
PARTS=${PARTS:-"default wide-eager wide-compiled"}
WIDE_DIMS=${WIDE_DIMS:-"4096 11008 32"}  # hidden, intermediate, heads of the 2-layer model (Llama-2-7B's)  # any of them, in this order (a call runs at most 10 minutes)
has() { [[ " $PARTS " == *" $1 "* ]]; }
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(HOME=/tmp/rayhome ray get-auth-token --generate 2>/dev/null | tail -1)
get() { $PY -c "import sys,urllib.request as u;r=u.Request(sys.argv[1],headers={'Authorization':'Bearer '+sys.argv[2]});print(u.urlopen(r,timeout=5).read()[:80].decode())" "$1" "$RAY_AUTH_TOKEN" 2>/dev/null; }
wait_for() { for _ in $(seq 90); do get "$1" >/dev/null && return 0; sleep 1; done; echo "FAIL: nothing at $1"; return 1; }
# Logical CPUs: the worker, the data stage's read tasks and tokenizer actor, the evaluation (a head with fewer
# waits on them forever; the GPU box has 16 cores)
ray start --head --num-cpus $(( $(nproc) > 4 ? $(nproc) : 4 )) --num-gpus 1 --include-dashboard=true --dashboard-host 127.0.0.1 --disable-usage-stats >"$OUT/ray-head.log" 2>&1
wait_for http://127.0.0.1:8265/api/version || exit 1
pkill -f "mlflow server --host 127.0.0.1 --port 5055" && sleep 2  # a server left by an earlier call (warm box)
setsid $PY -m mlflow server --host 127.0.0.1 --port 5055 --backend-store-uri sqlite:////tmp/mlflow.db \
  --artifacts-destination /tmp/mlartifacts --workers 1 >"$OUT/mlflow.log" 2>&1 &
wait_for http://127.0.0.1:5055/health || exit 1
URI=http://127.0.0.1:5055
submit() {  # submit NAME ENV_JSON ARGS...: one restore job from an uploaded copy of this checkout
  local name=$1 env=$2; shift 2
  local start=$(date +%s)
  ray job submit --address http://127.0.0.1:8265 --working-dir . \
    --runtime-env-json "{\"excludes\": [\".whl\", \".site\", \"runs\", \"outputs\", \".git\"], \"env_vars\": $env}" \
    -- python3 -m pipelines.cli restore --ray.use_gpu $USE_GPU --workers 1 --tracking-uri $URI "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - start )) s; $(grep -E 'done in|error' "$OUT/$name.log" | tail -2)"
}

# 1. the bundled default on the GPU; the worker dies once after step 120 and Ray Train restarts it
if has default; then
submit default "{\"LINEARARD_FAIL_ONCE_AT_STEP\": \"$FAIL_AT\"}" --output /tmp/run-default --ray.max_failures 1 \
  $DEFAULT_EXTRA
$PY - <<'PY' 2>&1 | tail -4 | tee "$OUT/registry.txt"
import glob, mlflow, torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM
uri = "http://127.0.0.1:5055"; mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
version = max(MlflowClient(uri).search_model_versions("name='linearard-restored'"), key=lambda v: int(v.version))
local = mlflow.artifacts.download_artifacts(f"models:/linearard-restored/{version.version}")
folder = sorted(glob.glob(f"{local}/**/config.json", recursive=True))[0].rsplit("/", 1)[0]
model = AutoModelForCausalLM.from_pretrained(folder).to("cuda" if torch.cuda.is_available() else "cpu")
steps = [int(m.value) for m in MlflowClient(uri).get_metric_history(version.run_id, "step")]
resumed = [m.value for m in MlflowClient(uri).get_metric_history(version.run_id, "resumed_from_step")]
print(f"registered version {version.version} ({version.status}) loads with from_pretrained:",
      type(model).__name__, model.config.rope_parameters, "| steps logged", len(steps), "| resumed from", resumed)
PY
fi

# 2. a 7B-wide model: Llama-2-7B layer shapes, 2 layers, random weights on disk; short ARD runs at 4K, and the
#    plain-process benchmark of the same shape and LoRA in the same call (the Ray overhead)
if has wide-eager || has wide-compiled; then
[ -f /tmp/wide7b/config.json ] || $PY - $WIDE_DIMS <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
hidden, intermediate, heads = map(int, sys.argv[1:4])
config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=heads,
                     num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained("/tmp/wide7b")
PY
WIDE_ARGS=(--teacher /tmp/wide7b --student none --rope linear:8 --method ard --model.tokenizer linearard/assets/tiny-llama
      --model.dtype bfloat16 --model.gradient_checkpointing true --lora.r 64 --lora.alpha 128 --data.ctx_len 4096
      --train.batch_size 1 --train.steps 12 --train.checkpoint_every 0 --optim.warmup_steps 0 --eval.ppl_tokens 4096
      --eval.length_multipliers "[1]" --eval.passkey_trials 0 --tracking.registered_model_name null)
fi
if has wide-eager; then
  submit wide-eager '{}' "${WIDE_ARGS[@]}" --output /tmp/run-wide-eager
  [ "$USE_GPU" = true ] && $PY benchmarks/ard_step.py --models llama2-7b-2l --contexts 4096 --modes ard --lora-r 64 \
    --steps 5 --out "$OUT/ard_step_wide.json" 2>&1 | tail -3
fi
if has wide-compiled; then
  submit wide-compiled '{}' "${WIDE_ARGS[@]}" --train.compile true --output /tmp/run-wide-compiled
  [ "$USE_GPU" = true ] && $PY benchmarks/ard_step.py --models llama2-7b-2l --contexts 4096 --modes ard --lora-r 64 \
    --steps 5 --compile --out "$OUT/ard_step_wide_compiled.json" 2>&1 | tail -3
fi
$PY - <<'PY' 2>&1 | tee "$OUT/ray_tokens.txt"
import statistics
from mlflow.tracking import MlflowClient
client = MlflowClient("http://127.0.0.1:5055")
for run in client.search_runs(client.get_experiment_by_name("linearard").experiment_id):
    history = client.get_metric_history(run.info.run_id, "tokens_per_s")
    if history:
        values = [m.value for m in sorted(history, key=lambda m: m.step)][2:]  # after warm-up (and compile)
        peak = client.get_metric_history(run.info.run_id, "peak_memory_gib")
        print(run.info.run_name, run.info.status, "median tokens/s after 2 steps:",
              round(statistics.median(values)), "steps", len(history),
              "peak GiB", round(max(m.value for m in peak), 2) if peak else None)
PY
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
ray stop >/dev/null 2>&1
pkill -f "mlflow server --host 127.0.0.1 --port 5055"
