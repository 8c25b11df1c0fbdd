"""The web page's libraries (markdown, sanitizer, code highlighting): npm packages copied into the
git-ignored levante/web/vendor, which the server serves. `make web` runs this, and so does the
build of a wheel (setup.py) when the folder lacks them, so that a wheel, and `pip install .`,
carry them. Without npm the page still works, rendering answers as plain text.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = ["marked@18.2.1", "dompurify@3.4.18", "@highlightjs/cdn-assets@11.12.0"]
# The file served (in levante/web/vendor) -> where the packages above put it (under node_modules).
FILES = {
    "marked.esm.js": "marked/lib/marked.esm.js",
    "purify.es.mjs": "dompurify/dist/purify.es.mjs",
    "highlight.es.min.js": "@highlightjs/cdn-assets/es/highlight.min.js",
    "highlight-light.css": "@highlightjs/cdn-assets/styles/github.min.css",
    "highlight-dark.css": "@highlightjs/cdn-assets/styles/github-dark.min.css",
    "marked.LICENSE": "marked/LICENSE",
    "dompurify.LICENSE": "dompurify/LICENSE",
    "highlight.js.LICENSE": "@highlightjs/cdn-assets/LICENSE",
}


def build(root: Path) -> bool:
    """Fill `root`/levante/web/vendor unless it holds these versions already; False without npm."""
    vendor = root / "levante" / "web" / "vendor"
    stamp = vendor / ".built"  # the packages it was built from (a source distribution carries no stamp)
    wanted = "\n".join(PACKAGES)
    if all((vendor / name).is_file() for name in FILES) and (not stamp.is_file() or stamp.read_text() == wanted):
        return True
    npm = shutil.which("npm")
    if npm is None:
        print("npm not found: the web chat will show answers as plain text (install npm, then make web)",
              file=sys.stderr)
        return False
    work = root / ".web-build"
    subprocess.run([npm, "install", "--prefix", str(work), "--no-audit", "--no-fund", "--loglevel=error", *PACKAGES],
                   check=True)
    vendor.mkdir(parents=True, exist_ok=True)
    for name, source in FILES.items():
        shutil.copyfile(work / "node_modules" / source, vendor / name)
    stamp.write_text(wanted)
    return True


if __name__ == "__main__":
    build(Path(__file__).resolve().parent.parent)
