"""Where passkey retrieval breaks, answer token by answer token: for each model (and RoPE or attention-temperature
variant), the exact retrieval the evaluation reports, the teacher-forced accuracy of each answer token, and the
share of answer tokens that are digits at all (a model that still answers "a number" but not the key has lost
the copy from the needle, not the format). Prints a table, writes JSON.

    python benchmarks/passkey_probe.py      # the bundled teacher, with its RoPE x2 and x4, the extended model
    python benchmarks/passkey_probe.py --models runs/restore/model --temperatures 1 1.5 2.5
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from harness import environment, markdown_table, results_path, write_json  # noqa: E402  (also: the import path)

ASSETS = Path(__file__).resolve().parents[1] / "linearard" / "assets"
DEFAULT_MODELS = [str(ASSETS / "tiny-llama"), f"{ASSETS / 'tiny-llama'}@linear:2", f"{ASSETS / 'tiny-llama'}@linear:4",
                  str(ASSETS / "tiny-llama-4x")]


def load(spec: str) -> torch.nn.Module:
    """``path`` or ``path@rope`` (``linear:4``: that model with its RoPE scaled, no training)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from linearard.rope import parse_rope_spec, scaled_config

    path, _, rope = spec.partition("@")
    config = AutoConfig.from_pretrained(path)
    if rope:
        config = scaled_config(config, parse_rope_spec(rope))
    return AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def shown(spec: str) -> str:
    """A model spec as the table shows it: a bundled model by its folder name."""
    path, at, rope = spec.partition("@")
    inside = Path(path).resolve().is_relative_to(ASSETS)
    return (Path(path).name if inside else path) + at + rope


@torch.inference_mode()
def probe(model: torch.nn.Module, tokenizer, length: int, depths: list[float], trials: int) -> dict:
    """Exact retrieval, teacher-forced accuracy per answer token, and the digit share of the argmax answers."""
    from linearard.evaluate import answer_argmax, passkey_example

    rng = random.Random(0)
    examples = [passkey_example(tokenizer, length, d, rng.randint(10000, 99999)) for d in depths for _ in range(trials)]
    predicted, gold = answer_argmax(model, torch.stack([e[0] for e in examples]), examples[0][1])
    right = predicted == gold
    answers = [tokenizer.decode(row).strip() for row in predicted]
    return {"exact": right.all(-1).float().mean().item(), "per_token": right.float().mean(0).tolist(),
            "digit_share": sum(c.isdigit() for a in answers for c in a) / max(1, sum(len(a) for a in answers)),
            "example": f"{tokenizer.decode(gold[0]).strip()} -> {answers[0]!r}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="paths, or path@rope (e.g. @linear:4)")
    parser.add_argument("--tokenizer", default=str(ASSETS / "tiny-llama"))
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=8, help="keys per depth")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0],
                        help="multipliers of every layer's attention scale (YaRN-style sharpening)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/passkey_probe-<date>-<card>.json)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows, table = [], []
    for spec in args.models:
        model = load(spec)
        layers = model.model.layers
        scales = [layer.self_attn.scaling for layer in layers]
        for temperature in args.temperatures:
            for layer, scale in zip(layers, scales):
                layer.self_attn.scaling = scale * temperature
            result = {"model": shown(spec), "temperature": temperature,
                      **probe(model, tokenizer, args.length, args.depths, args.trials)}
            rows.append(result)
            table.append([result["model"], f"{temperature:g}", f"{result['exact']:.2f}",
                          " ".join(f"{a:.2f}" for a in result["per_token"]), f"{result['digit_share']:.2f}",
                          result["example"]])
    print(markdown_table(["model", "attention ×", "exact", "per answer token (teacher-forced)", "digits",
                          "e.g."], table))
    device = torch.device("cpu")
    path = results_path("passkey_probe", device, args.out)
    write_json(path, {**environment(device), "argv": sys.argv[1:], "length": args.length, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
