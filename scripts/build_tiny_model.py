"""Rebuild the bundled tiny model and its corpus (``linearard/assets/``). Two stages:

    # 1. corpus: the Python standard library's .py sources and pydoc topics of the Python running this,
    #    split by whole files (held-out eval files), written as gzipped JSON lines. Its text depends on the
    #    Python version, which is why the result is committed and stage 2 reads only the committed files.
    python scripts/build_tiny_model.py corpus

    # 2. train: byte-level tokenizer + a Llama (GQA) pretrained from scratch on the committed corpus mixed
    #    with synthetic passkey documents, saved in HF format, then evaluated (teacher and RoPE linear ×4).
    python scripts/build_tiny_model.py train --device cuda      # ~1-2 min on one H100; ~1 s/step on 2 CPU cores

Both stages are deterministic given ``--seed``: the corpus bytes exactly; training exactly on CPU and up to
the last digits on CUDA (cuBLAS/SDPA kernels may sum in another order). See docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS; set before torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from linearard.data import tokenize  # noqa: E402
from linearard.config import EvalConfig  # noqa: E402
from linearard.evaluate import evaluate_models, passkey_example  # noqa: E402
from linearard.report import report_markdown, write_report  # noqa: E402
from linearard.rope import parse_rope_spec, scaled_config  # noqa: E402
from linearard.tiny import ASSETS, bundled_corpus, bundled_model_path  # noqa: E402

# encodings/ is mostly generated charmap tables: trivially predictable text that would flatter perplexity.
SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "encodings", "__pycache__"}
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")  # ids 256, 257, 258 after the 256 bytes


# ----------------------------------------------------------------------------------------------- corpus

def collect_documents() -> list[dict[str, str]]:
    """Every stdlib ``.py`` file (tests, IDLE and demos left out) and every pydoc topic, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS & set(relative.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append({"source": f"stdlib/{relative.as_posix()}", "text": text})
    from pydoc_data.topics import topics

    docs += [{"source": f"pydoc/{name}", "text": topics[name]} for name in sorted(topics)]
    return docs


def write_jsonl_gz(records: list[dict[str, str]], path: Path) -> None:
    """Gzipped JSON lines with a zero mtime and no file name in the header, so equal records give equal bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def build_corpus(args: argparse.Namespace) -> None:
    docs = collect_documents()
    random.Random(args.seed).shuffle(docs)
    n_eval = math.ceil(args.eval_fraction * len(docs))
    eval_docs, train_docs, size = docs[:n_eval], [], 0
    for doc in docs[n_eval:]:  # fill the byte budget in shuffled order, skipping files that would overflow it
        n = len(doc["text"].encode("utf-8"))
        if size + n <= args.train_bytes:
            train_docs.append(doc)
            size += n
    out = Path(args.out)
    for split, records in (("train", train_docs), ("eval", eval_docs)):
        write_jsonl_gz(records, out / f"{split}.jsonl.gz")
        nbytes = sum(len(r["text"].encode("utf-8")) for r in records)
        print(f"{split}: {len(records)} documents, {nbytes / 1e6:.2f} MB of text, "
              f"{(out / f'{split}.jsonl.gz').stat().st_size / 1e6:.2f} MB gzipped")
    print(f"from Python {platform.python_version()} at {sysconfig.get_paths()['stdlib']}")


# ------------------------------------------------------------------------------------- tokenizer, model

def build_tokenizer():
    """Byte-level fast tokenizer: token id = byte value (0-255), then <bos> <eos> <pad>; no merges, so any
    text round-trips. Built with `tokenizers` (GPT-2's byte-to-unicode alphabet) and loadable offline by
    ``AutoTokenizer.from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_of_byte = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {char_of_byte[b]: b for b in range(256)} | {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_model(tokenizer, ctx_len: int, seed: int):
    """Llama with GQA (4 layers, hidden 256, 8 query / 2 KV heads of 32, tied embeddings): ~2.9M parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=ctx_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)  # initialise on CPU, so the initial weights do not depend on the device
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------------ data

class Batches:
    """Training batches ``[B, T]``: random windows of the train stream (documents joined by EOS), and with
    probability ``passkey_fraction`` per row a passkey document of random length in ``passkey_lengths`` (default
    [128, T]), depth and key (the format of ``linearard.evaluate.passkey_example``), followed by EOS and a code
    window."""

    def __init__(self, tokenizer, ctx_len: int, batch_size: int, passkey_fraction: float, seed: int,
                 passkey_lengths: tuple[int, int] | None = None):
        docs = tokenize(bundled_corpus("train"), tokenizer)
        eos = np.array([tokenizer.eos_token_id])
        self.stream = torch.from_numpy(np.concatenate([part for doc in docs for part in (np.asarray(doc), eos)]))
        self.tokenizer, self.T, self.B, self.fraction = tokenizer, ctx_len, batch_size, passkey_fraction
        self.lengths = passkey_lengths or (128, ctx_len)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.stream) - self.T, (self.B,), generator=self.generator)
        batch = self.stream[starts[:, None] + torch.arange(self.T)]
        is_passkey = torch.rand(self.B, generator=self.generator) < self.fraction
        for row in is_passkey.nonzero().flatten().tolist():
            length = self.rng.randint(*self.lengths)
            ids, _ = passkey_example(self.tokenizer, length, self.rng.random(), self.rng.randint(10000, 99999))
            code = batch[row, :self.T - length - 1].clone()  # the start of the row's own code window
            batch[row, :length] = ids
            if length < self.T:
                batch[row, length] = self.tokenizer.eos_token_id
                batch[row, length + 1:] = code
        return batch


# --------------------------------------------------------------------------------------------- training

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.ctx_len, args.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    batches = Batches(tokenizer, args.ctx_len, args.batch_size, args.passkey_fraction, args.seed)
    print(f"train stream: {len(batches.stream) / 1e6:.2f}M tokens; {args.steps} steps x {args.batch_size} x "
          f"{args.ctx_len} = {args.steps * args.batch_size * args.ctx_len / 1e6:.1f}M tokens")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.05, cycle_momentum=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    start = time.time()
    progress = tqdm(range(args.steps), desc="pretraining", mininterval=5)
    for step in progress:
        ids = batches.next().to(device, non_blocking=True)
        with autocast:
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - start
    print(f"trained in {train_seconds:.0f} s; last loss {loss.item():.3f}")

    out = Path(args.out)
    save(model, tokenizer, out)
    report = evaluate_bundle(out, device, args)
    info = {
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds": round(train_seconds, 1), "parameters": n_params, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "final_train_loss": loss.item(),
        "report": report,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(report_markdown(report))
    if args.report_dir:
        write_report(report, args.report_dir)


def save(model, tokenizer, out: Path) -> None:
    """HF folder with bf16 weights (half the size; the recorded numbers are those of the rounded weights) and a
    config that asks for float32, so a plain ``from_pretrained`` computes in float32."""
    model = model.to("cpu", torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def evaluate_bundle(path: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """Teacher and RoPE linear ×4 from the saved folder, on the held-out split."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    config = scaled_config(AutoConfig.from_pretrained(path), parse_rope_spec("linear:4"))
    scaled = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).to(device)
    cfg = EvalConfig(ctx_len=args.ctx_len, ppl_tokens=args.eval_tokens, passkey_trials=args.passkey_trials,
                     batch_size=8, seed=args.seed)
    return evaluate_models({"teacher": teacher, "scaled": scaled}, tokenizer, bundled_corpus("eval"), cfg)



def add_training_args(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, out: Path) -> None:
    """The flags both bundled-model builders take (this script's ``train`` and scripts/build_extended_model.py)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--passkey-fraction", type=float, default=0.5, help="share of rows that are passkey docs")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored at each length")
    parser.add_argument("--passkey-trials", type=int, default=20, help="keys per (length, depth) cell")
    parser.add_argument("--out", default=str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    corpus = stages.add_parser("corpus", help="extract the corpus from this Python's standard library")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--eval-fraction", type=float, default=0.05, help="share of files held out for eval")
    corpus.add_argument("--train-bytes", type=int, default=8_000_000, help="cap on the train split's text")
    corpus.add_argument("--out", default=str(ASSETS / "corpus"))
    trainer = stages.add_parser("train", help="pretrain the tiny model on the committed corpus")
    add_training_args(trainer, steps=2000, batch_size=96, lr=2e-3, out=bundled_model_path())
    trainer.add_argument("--ctx-len", type=int, default=256, help="native context n")
    trainer.add_argument("--report-dir", default=None, help="also write report.json/.md and the plots here")
    args = parser.parse_args(argv)
    build_corpus(args) if args.stage == "corpus" else train(args)


if __name__ == "__main__":
    main()
