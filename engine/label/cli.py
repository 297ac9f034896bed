"""``rlfuse label sample | serve | export | stats`` (argument parsing only; see the package doc)."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlfuse label", description="People rank sampled responses.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("sample", help="K responses per prompt from a checkpoint -> tasks.jsonl")
    p.add_argument("--model", help="'tiny' (default), a local HF model directory, or a .gguf file")
    p.add_argument("--config", help="take the model section of this YAML (e.g. a run's config.yaml) or preset")
    p.add_argument("--adapter", help="checkpoint to sample from (a stage folder such as RUN/sft, or a ckpt folder)")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt} (optional system) or {messages}")
    p.add_argument("-k", type=int, default=4, help="responses per prompt (distinct; >= 2)")
    p.add_argument("--out", required=True, help="tasks JSONL to write")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=4, help="sampling rounds to replace duplicates")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("serve", help="the labelling page; labels are appended to --labels")
    p.add_argument("tasks")
    p.add_argument("--labels", required=True, help="labels JSONL (appended; read back on restart)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="beyond loopback, requests need the printed token")
    p.add_argument("--overlap", type=int, default=1, help="annotators who see each prompt")
    p.add_argument("--guidelines", metavar="FILE.md",
                   help="markdown shown above every task (what 'better' means); each label records its hash")

    p = sub.add_parser("export", help="labels -> rankings | pairs | trl JSONL")
    p.add_argument("labels")
    p.add_argument("--format", required=True, choices=["rankings", "pairs", "trl"])
    p.add_argument("--out", required=True)
    p.add_argument("--margin", action="store_true", help="trl: add the rank gap as 'margin'")
    p.add_argument("--trl-style", choices=["conversational", "standard"],
                   help="trl: message lists or plain strings, one style per file (default: conversational "
                        "when any task has a system message, else standard)")

    p = sub.add_parser("stats", help="per-annotator rates, position bias, agreement")
    p.add_argument("labels")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "sample":
        from ..config import ModelConfig, load_config
        from .sample import sample_tasks

        model = load_config(args.config).model if args.config else ModelConfig()
        if args.model:
            model.name_or_path = args.model
        result = sample_tasks(model, args.prompts, args.out, k=args.k,
                              adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, rounds=args.rounds, batch_size=args.batch_size,
                              seed=args.seed, device=args.device)
        print(json.dumps(result, indent=2))
    elif args.action == "serve":
        from .server import serve

        return serve(args.tasks, args.labels, host=args.host, port=args.port, overlap=args.overlap,
                     guidelines=args.guidelines)
    elif args.action == "export":
        from .export import export_labels

        print(json.dumps(export_labels(args.labels, args.format, args.out, margin=args.margin,
                                       trl_style=args.trl_style)))
    else:
        from .stats import print_stats

        print_stats(args.labels, as_json=args.json)
    sys.stdout.flush()  # a closed pipe (`| head`) surfaces here, where rlfuse's main handles it
    return 0
