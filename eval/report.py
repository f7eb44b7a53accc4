"""Rebuild an evaluation's summary.json, figures and report.md from its tables alone, and publish its headline.

    python eval/report.py --eval_dir RUN/eval                      # evaluate_checkpoints.py output
    python eval/report.py --eval_dir OUT                           # evaluate_prompts.py output (per_prompt.csv)
    python eval/report.py --eval_dir RUN/eval --publish docs/demo_headline.md --readme README.md

Every number in report.md is read from the tables (through summary.json), so the report and the tables
agree by construction. The pieces: eval/summary.py (tables -> summary), eval/figures.py (figures),
eval/markdown.py (report.md, headline.md), eval/prompt_report.py (the same for prompt sets).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval import markdown, prompt_report
from eval.tables import EvalError
from mem_analysis.cli import run_command
from mem_analysis.io import replace_marked_block, write_text_atomic

README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"  # replace_marked_block's, name "headline"


def publish_headline(eval_dir, docs_file, readme=None) -> None:
    """Copy eval_dir/headline.md to `docs_file` and, when given, into the README between the headline markers."""
    text = (Path(eval_dir) / "headline.md").read_text()
    write_text_atomic(Path(docs_file), text)
    if readme:
        replace_marked_block(readme, "headline", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild summary.json, figures and report.md from the tables")
    parser.add_argument("--eval_dir", required=True, help="an evaluate_checkpoints.py or evaluate_prompts.py output")
    parser.add_argument("--run_dir", default=None, help="the training run (warnings.jsonl); default: above --eval_dir")
    parser.add_argument("--publish", default=None,
                        help="also copy headline.md to this file (e.g. docs/demo_headline.md)")
    parser.add_argument("--readme", default=None,
                        help="with --publish: put the headline into this README's marked block")
    args = parser.parse_args(argv)
    eval_dir = Path(args.eval_dir)
    if (eval_dir / "per_prompt.csv").is_file():
        print(prompt_report.write_report(eval_dir))
    elif (eval_dir / "per_sample.csv").is_file():
        print(markdown.write_report(eval_dir, run_dir=args.run_dir))
    else:
        raise EvalError(f"--eval_dir {eval_dir} holds no per_sample.csv or per_prompt.csv; give the output folder "
                        "of eval/evaluate_checkpoints.py or eval/evaluate_prompts.py")
    if args.publish:
        publish_headline(eval_dir, args.publish, args.readme)
        print(f"published {args.publish}" + (f" and {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "report.py", bad_input=(EvalError, ValueError, FileNotFoundError)))
