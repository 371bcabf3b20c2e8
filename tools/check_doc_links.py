"""Checks every relative Markdown link (and its #anchor) in README.md, WORKSPACE.md, docs/*.md.

  python tools/check_doc_links.py [REPO]      exit 1 and one line per broken link
"""

import pathlib
import re
import sys

LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's heading anchor: lowercase, drop punctuation except - and _, spaces -> -."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = path.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            ids.add(slug(line.lstrip("#")))
    return ids


def main(root: pathlib.Path) -> int:
    files = [root / "README.md", root / "WORKSPACE.md", *sorted((root / "docs").glob("*.md"))]
    bad, count = [], 0
    for f in files:
        in_code = False
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                continue
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto: not checked here
                count += 1
                file_part, _, anchor = target.partition("#")
                dest = (f.parent / file_part).resolve() if file_part else f
                if not dest.exists():
                    bad.append(f"{f.relative_to(root)}:{n}: {target}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    bad.append(f"{f.relative_to(root)}:{n}: {target}: no anchor #{anchor}")
    print(f"{count} relative links in {len(files)} files, {len(bad)} broken")
    print("\n".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
