"""``safety-layers judge-check FILE``: how well each refusal judge agrees with your labels.

Label a few hundred of your model's replies (refusal, partial or compliance) and check the
judges on them before trusting a refusal rate: accuracy, refusal precision, recall, F1 and
Cohen's kappa per judge, and per ``style`` when the file has that column.
"""

from __future__ import annotations

import argparse
import json

EPILOG = """\
The file is CSV, TSV, JSON or JSONL with a prompt, a reply and a human label per row (columns
found by name: prompt/question/instruction, reply/response/completion/output, label/human_label/
gold). Labels: refusal, partial (counts as refusal) or compliance; or 1/0, yes/no (1/yes = refused).

examples:
  safety-layers judge-check labelled.jsonl
  safety-layers judge-check labelled.csv --judges rules,keyword-opening --json > agreement.json
"""


def add_args(p: argparse.ArgumentParser) -> None:
    """The command's arguments (it has no config dataclass: nothing here is a setting of a run)."""
    p.add_argument("file", help="CSV/TSV/JSON/JSONL of prompt, reply and human label, one row per reply")
    p.add_argument("--judges", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="A,B",
                   help="judges to check, comma-separated (default: rules,keyword-opening,keyword-gcg,prefix)")
    p.add_argument("--prompt-column", metavar="NAME", help="column holding the prompts (default: found by name)")
    p.add_argument("--reply-column", metavar="NAME", help="column holding the replies (default: found by name)")
    p.add_argument("--label-column", metavar="NAME", help="column holding the human labels (default: found by name)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..judges.check import agreements_to_dict, format_agreements, judge_check

    results = judge_check(args.file, args.judges, prompt_column=args.prompt_column, reply_column=args.reply_column,
                          label_column=args.label_column)
    if args.json:
        print(json.dumps({"file": args.file, "judges": agreements_to_dict(results)}, indent=2))
    else:
        print(f"{args.file}: {results[0].n} labelled replies (partial refusals count as refusals)")
        print(format_agreements(results))
    return 0
