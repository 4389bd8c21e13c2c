"""wd_fairseq: Weight Distillation for fairseq (a --user-dir plugin plus tools)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStartupHook(build_py):
    """Also install ``wd_fairseq.pth`` into site-packages: it lets stock fairseq
    commands load fairseq checkpoints under torch >= 2.6 (see safe_loading.py) and
    silences their known library noise (see quiet_logs.py)."""

    def run(self):
        super().run()
        self.copy_file("wd_fairseq.pth", os.path.join(self.build_lib, "wd_fairseq.pth"))


setup(
    name="wd_fairseq",
    version="0.1.0",
    description="Weight Distillation (Lin et al., ACL 2021) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["wd_fairseq"],
    cmdclass={"build_py": BuildWithStartupHook},
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
        ],
    },
)
