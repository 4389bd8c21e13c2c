"""wd_fairseq: Weight Distillation for fairseq (a --user-dir plugin plus tools)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 64: PEP 660 editable installs (pip install -e .)
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # older setuptools installs editable packages with `develop`: no hook
    editable_wheel = None

HOOK_NAME = "wd_fairseq.pth"


def startup_hook(package_dir: str) -> str:
    """The lines of ``wd_fairseq.pth``: at interpreter start-up, load safe_loading.py and
    quiet_logs.py alone (standard library only; no package import) from ``package_dir``,
    a Python expression (``sitedir`` is the directory of the .pth being read)."""
    lines = []
    for module, call in (("safe_loading", "install_import_hook"), ("quiet_logs", "install")):
        lines.append(
            "import importlib.util as _u, os as _o; "
            f"_s = _u.spec_from_file_location('wd_fairseq_{module}', _o.path.join({package_dir}, '{module}.py')); "
            f"_m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.{call}()"
        )
    return "\n".join(lines) + "\n"


class BuildWithStartupHook(build_py):
    """Also install ``wd_fairseq.pth`` into site-packages: it lets stock fairseq
    commands load fairseq checkpoints under torch >= 2.6 (see safe_loading.py) and
    silences their known library noise (see quiet_logs.py)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # setuptools < 64 has no editable mode
            with open(os.path.join(self.build_lib, HOOK_NAME), "w") as f:
                f.write(startup_hook("_o.path.join(sitedir, 'wd_fairseq')"))


cmdclass = {"build_py": BuildWithStartupHook}
if editable_wheel is not None:

    class EditableWithStartupHook(editable_wheel):
        """``pip install -e .``: the same hook, loading the modules from this checkout.
        Every file in the wheel's unpacked directory is installed, and setuptools
        fills that directory in ``_install_namespaces`` (the one place to add a file)."""

        def _install_namespaces(self, installation_dir, pth_prefix):
            super()._install_namespaces(installation_dir, pth_prefix)
            package_dir = os.path.abspath(os.path.join(os.path.dirname(__file__), "wd_fairseq"))
            with open(os.path.join(installation_dir, HOOK_NAME), "w") as f:
                f.write(startup_hook(repr(package_dir)))

    cmdclass["editable_wheel"] = EditableWithStartupHook


setup(
    name="wd_fairseq",
    version="0.1.0",
    description="Weight Distillation (Lin et al., ACL 2021) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["wd_fairseq"],
    cmdclass=cmdclass,
    # fairseq 0.12.2 does not import on Python 3.11; fairseq-fixed is the
    # maintained build of 0.12 that does. The plugin works with any fairseq 0.12.x.
    install_requires=[
        "fairseq-fixed==0.12.3.1",
        "torch==2.13.0",
        "sacrebleu==2.6.0",
        "subword-nmt==0.3.8",
        "sacremoses==0.2.0",
        # wd-kd-data's default engine and wd-export-ct2.
        "ctranslate2==4.8.5",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0"],
        "deploy": [],  # kept for `pip install '.[deploy]'`: ctranslate2 is now a dependency
        # examples/demo.sh and benchmark.sh plot their results (3.11 needs Python >= 3.11).
        "demo": ["matplotlib==3.11.2; python_version >= '3.11'",
                 "matplotlib==3.9.4; python_version < '3.11'"],
    },
    entry_points={
        "console_scripts": [
            "wd-materialize = wd_fairseq.materialize:cli_main",
            "wd-export-ct2 = wd_fairseq.export_ctranslate2:cli_main",
            "wd-kd-data = wd_fairseq.kd_data:cli_main",
            "wd-evaluate = wd_fairseq.evaluation:cli_main",
            "wd-train = wd_fairseq.launch:cli_main",
            "wd-init-student = wd_fairseq.init_student:cli_main",
            "wd-trim-vocab = wd_fairseq.trim_vocab:cli_main",
            "wd-translate = wd_fairseq.translate:cli_main",
            "wd-distill = wd_fairseq.distill:cli_main",
        ],
    },
)
