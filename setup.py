"""setuptools builds levante as pyproject.toml says; this adds one step: a wheel carries the web page's
libraries, built from npm when levante/web/vendor lacks them (tools/web_vendor.py, as `make web`)."""
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithWebLibraries(build_py):
    def run(self):
        script = ROOT / "tools" / "web_vendor.py"
        if script.is_file():  # before package data is listed, so that the built files are in it
            runpy.run_path(str(script))["build"](ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithWebLibraries})
