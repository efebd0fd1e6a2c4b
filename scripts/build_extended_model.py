"""Build the bundled extended model (``linearard/assets/tiny-llama-4x``) from the bundled teacher, as a long-context
model is made in practice: RoPE ×4 (position interpolation) and continual pre-training at 4n.

    python scripts/build_extended_model.py --device cuda          # ~1 min on one H200
    python scripts/build_extended_model.py --device cpu --steps 2 --batch-size 2 --out /tmp/x   # a smoke run

The training is the project's own: the plan of a ``cpt`` run on the teacher with ``--model.rope linear:4`` and the
whole model trainable, ``build_teacher_student``, the training loop ``Trainer.fit`` and ``save_merged``. Its data
is the bundled train corpus at 4n = 1024 tokens a row, with passkey documents (the evaluation's format) of
length in [--passkey-min, 4n] in ``--passkey-fraction`` of the rows, so that the model learns to retrieve at
its new length. Passkey documents are here and only here: restoring reads ordinary text (the restore job's
data holds none). The folder gets ``build_info.json`` (command, card, date, versions, the evaluation of teacher
and extended model) like the teacher's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny_model import Batches, add_training_args, pick_device, save  # noqa: E402

from linearard.checkpoint import LocalCheckpoints  # noqa: E402
from linearard.config import EvalConfig, RunConfig  # noqa: E402
from linearard.evaluate import evaluate_models  # noqa: E402
from linearard.models import build_teacher_student, merged_model  # noqa: E402
from linearard.plan import resolve  # noqa: E402
from linearard.report import report_markdown  # noqa: E402
from linearard.tiny import bundled_corpus, bundled_extended_model_path, bundled_model_path  # noqa: E402
from linearard.train import Trainer, seed_everything  # noqa: E402


def build(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    plan = resolve(RunConfig.from_dict({
        "model": {"teacher": str(bundled_model_path()), "student": None, "rope": "linear:4", "trainable": "full"},
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 20), "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "data": {"ctx_len": 256},  # n: the stage reads 4n blocks
        "train": {"method": "cpt", "steps": args.steps, "batch_size": 4 * args.batch_size, "seed": args.seed,
                  "checkpoint_every": 0, "progress_bar": True},
    }))
    (stage,) = plan.stages
    window = stage.config.data.ctx_len
    seed_everything(args.seed)
    teacher, student, tokenizer = build_teacher_student(plan.models, stage.config.lora, device)
    batches = Batches(tokenizer, window, stage.config.train.batch_size, args.passkey_fraction, args.seed,
                      passkey_lengths=(args.passkey_min, window))
    trainer = Trainer(stage.config, teacher, student, device=device)
    start = time.time()
    with tempfile.TemporaryDirectory() as checkpoints:
        stream = ({"input_ids": batches.next()} for _ in iter(int, 1))  # endless
        metrics = trainer.fit(stream, LocalCheckpoints(checkpoints))
    seconds = time.time() - start
    out = Path(args.out)
    save(merged_model(student), tokenizer, out)

    from transformers import AutoModelForCausalLM

    cfg = EvalConfig(ctx_len=256, ppl_tokens=args.eval_tokens, passkey_trials=args.passkey_trials, seed=args.seed)
    models = {"teacher": teacher.float(), "extended": AutoModelForCausalLM.from_pretrained(out).to(device)}
    report = evaluate_models(models, tokenizer, bundled_corpus("eval"), cfg)
    info = {
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds": round(seconds, 1), "train_tokens": trainer.tokens_seen, "final_train_loss": metrics["lm"],
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, "report": report,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(report_markdown(report))
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_args(parser, steps=1000, batch_size=32, lr=1e-3, out=bundled_extended_model_path())  # rows of 4n
    parser.add_argument("--passkey-min", type=int, default=512, help="shortest passkey document (tokens)")
    return build(parser.parse_args(argv))


if __name__ == "__main__":
    main()
