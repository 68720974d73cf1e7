#!/usr/bin/env python3
"""Rewrite citations of the out-of-tree spec (``protocol.md §x``) to the repo's docs/.

One-off tool for the integrator (delete it, and docs-map.tsv, afterwards). Handles
``protocol.md §9.3``, ``(protocol.md §9.3)``, lists (``protocol.md §2.2, §5.1 and §6``),
ranges (``§10-§13``, ``§3.1–§3.3``), step labels (``§3.1 P1–P8``: a map key ``§3.1 P``
wins over ``§3.1``) and, unless ``--no-bare``, citations without the file name
(``(§12.3)``). A section missing from the map falls back to its parent (reported); a
citation that still cannot be mapped is left as it is and reported, as is a bare
``protocol.md`` without a section.

    python3 rewrite-refs.py [--map docs-map.tsv] [--dry-run] [--no-bare] FILE...

Exit status: 0 when everything was mapped, 1 when something was reported as unmapped.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

NUM = r"\d+(?:\.\d+)*"
LABEL = r"[A-Z]\d+(?:\s*[–/-]\s*[A-Z]?\d+)*"
# one cited item: §N, optionally a range to §M / M, optionally step labels
ITEM = rf"§(?P<a>{NUM})(?:\s*[–-]\s*§?(?P<b>{NUM}))?(?:\s+(?P<label>{LABEL}))?"
ITEM_RE = re.compile(ITEM)
SEP = r"\s*,\s*(?:and\s+)?|\s+and\s+"
ITEM_PLAIN = ITEM.replace("?P<a>", "").replace("?P<b>", "").replace("?P<label>", "")
LIST = rf"{ITEM_PLAIN}(?:(?:{SEP}){ITEM_PLAIN})*"
CITED_RE = re.compile(rf"protocol\.md\s+(?P<list>{LIST})")
BARE_RE = re.compile(rf"(?<![\w/#.])(?P<list>{LIST})")
LONE_RE = re.compile(r"(?<![\w-])protocol\.md(?!\s+§)")
OTHER_FILE_RE = re.compile(rf"(?<![\w-])(?!protocol\.md)[\w-]+\.md\s+§{NUM}")  # after the first pass, only non-mapped files
AFTER_FILE_RE = re.compile(r"[\w-]+\.md\s+\Z")
SPLIT_RE = re.compile(rf"({SEP})")


def load_map(path: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            try:
                key, target = line.split("\t")[:2]
            except ValueError:
                sys.exit(f"{path}:{lineno}: expected '§x<TAB>docs/file.md#anchor'")
            mapping[key.strip()] = target.strip()
    return mapping


def expand(a: str, b: str | None) -> list[str]:
    """The sections of ``a``..``b``: same-depth ranges are expanded, others are endpoints."""
    if b is None:
        return [a]
    pa, pb = a.split("."), b.split(".")
    if len(pa) == len(pb) and pa[:-1] == pb[:-1] and int(pa[-1]) <= int(pb[-1]):
        prefix = ".".join(pa[:-1])
        return [(prefix + "." if prefix else "") + str(n) for n in range(int(pa[-1]), int(pb[-1]) + 1)]
    return [a, b]


class Rewriter:
    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping
        self.notes: list[str] = []
        self.unmapped: list[str] = []
        self.count = 0

    def target(self, section: str, label: str | None, where: str) -> str | None:
        if label:
            refined = self.mapping.get(f"§{section} {label[0]}")
            if refined:
                return refined
        if f"§{section}" in self.mapping:
            return self.mapping[f"§{section}"]
        parts = section.split(".")
        while len(parts) > 1:
            parts.pop()
            parent = ".".join(parts)
            if f"§{parent}" in self.mapping:
                self.notes.append(f"{where}: §{section} mapped via its parent §{parent}")
                return self.mapping[f"§{parent}"]
        return None

    def rewrite_list(self, text: str, where: str) -> str | None:
        """The rewritten citation list, or None if any item cannot be mapped."""
        pieces = SPLIT_RE.split(text)  # item, sep, item, sep, ...
        items: list[tuple[str, list[str], str | None]] = []  # (separator before, targets, label)
        for index in range(0, len(pieces), 2):
            m = ITEM_RE.fullmatch(pieces[index])
            if m is None:
                return None
            label = m.group("label")
            targets: list[str] = []
            for section in expand(m.group("a"), m.group("b")):
                t = self.target(section, label, where)
                if t is None:
                    if section in (m.group("a"), m.group("b")):
                        return None
                    continue  # a hole inside a range
                if t not in targets:
                    targets.append(t)
            items.append((pieces[index - 1] if index else "", targets, label))
        # A whole page next to one of its own anchors adds nothing: keep the anchor.
        anchored = {t.partition("#")[0] for _, ts, _ in items for t in ts if "#" in t}
        out: list[str] = []
        seen: set[str] = set()
        for sep, targets, label in items:
            fresh = [t for t in targets if t not in seen and not ("#" not in t and t in anchored)]
            if not fresh and not label:
                continue  # everything this item names is already cited
            seen.update(targets)
            item = ", ".join(fresh or targets) + (f" {label}" if label else "")
            if out:
                out.append(sep)
            out.append(item)
        return "".join(out)

    def rewrite(self, text: str, name: str, bare: bool) -> str:
        def line_of(pos: int) -> str:
            return f"{name}:{text.count(chr(10), 0, pos) + 1}"

        def cited(m: re.Match) -> str:
            new = self.rewrite_list(m.group("list"), line_of(m.start()))
            if new is None:
                self.unmapped.append(f"{line_of(m.start())}: {m.group(0)!r}")
                return m.group(0)
            self.count += 1
            return new

        def bare_cited(m: re.Match) -> str:
            if AFTER_FILE_RE.search(text, 0, m.start()):
                return m.group(0)  # cites another file (protocol-v07.md, or left unmapped above)
            return cited(m)

        text = CITED_RE.sub(cited, text)
        for m in LONE_RE.finditer(text):
            self.unmapped.append(f"{line_of(m.start())}: 'protocol.md' without a section")
        for m in OTHER_FILE_RE.finditer(text):
            self.unmapped.append(f"{line_of(m.start())}: {m.group(0)!r} cites another file")
        if bare:
            text = BARE_RE.sub(bare_cited, text)
        return text


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--map", default=os.path.join(here, "docs-map.tsv"))
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
    parser.add_argument("--no-bare", action="store_true", help="only rewrite 'protocol.md §x'")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    rw = Rewriter(load_map(args.map))
    changed = 0
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = rw.rewrite(old, path, bare=not args.no_bare)
        if new != old:
            changed += 1
            if not args.dry_run:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    for note in rw.notes:
        print("note:", note)
    for item in rw.unmapped:
        print("UNMAPPED:", item)
    verb = "would rewrite" if args.dry_run else "rewrote"
    print(f"{verb} {rw.count} citation(s) in {changed} file(s); {len(rw.unmapped)} unmapped")
    return 1 if rw.unmapped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
