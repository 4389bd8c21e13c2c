"""Shared fixtures: a toy translation corpus, its data-bins, and tiny stock teachers.

Everything goes through the real fairseq entry points (``fairseq-preprocess``,
``fairseq-train``) run as new processes from this interpreter's environment: fairseq's and
wd_fairseq's console scripts as forks of a process that has imported torch and fairseq once
(tests/cli_zygote.py), whether a test calls them (``run_cli``) or a script the test starts
does (through stand-ins on ``PATH``, tests/cli_shim.py); others as subprocesses.
``WD_TESTS_SUBPROCESS=1`` runs them all as subprocesses.
"""

import fcntl
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import cli_shim
from cli_zygote import Zygote

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
USER_DIR = str(REPO / "wd_fairseq")

#: A tiny teacher: 3+3 layers so that 2-layer students have uneven groups.
TEACHER_SHAPE = [
    "--encoder-layers", "3", "--decoder-layers", "3",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]
TRAIN_FLAGS = [
    "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "5e-3",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
    "--max-tokens", "2000", "--criterion", "label_smoothed_cross_entropy",
    "--label-smoothing", "0.1", "--seed", "1", "--no-progress-bar", "--log-interval", "20",
    "--no-epoch-checkpoints", "--num-workers", "0", "--data-buffer-size", "0",
]


#: The slowest files first (each 1.5-3.5 minutes on 2 busy cores, slowest first:
#: benchmarks/results/cpu/test_suite-amd.json): pytest-xdist hands out whole files in
#: collection order (tests/run.sh: --no-loadscope-reorder), so the workers finish together.
SLOW_FILES_FIRST = ("test_gpu_check.py", "test_multilingual.py", "test_recipes.py", "test_study.py",
                    "test_pipeline.py", "test_distill.py", "test_wd_model.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES_FIRST)))


#: This pytest process's zygote (cli_zygote.py) and the directory of the stand-ins that run
#: scripts through it, set up with the session (fixture cli_zygote).
_zygote = None
_stand_ins = None


def zygote_for(tool: str):
    """The zygote that runs ``tool``, or None: a real subprocess runs it."""
    if not tool.startswith(("fairseq-", "wd-")) or os.environ.get("WD_TESTS_SUBPROCESS") == "1" \
            or not (BIN / tool).is_file():
        return None
    return _zygote


@pytest.fixture(scope="session", autouse=True)
def cli_zygote(tmp_path_factory):
    """This worker's zygote; this environment's scripts first on the ``PATH`` that every
    command of the tests inherits, behind stand-ins that run them through the zygote
    (cli_shim.py): a recipe's or ``wd-distill``'s own calls of fairseq's and wd_fairseq's
    console scripts, and of ``python SCRIPT.py``, are forks too. ``WD_TESTS_SUBPROCESS=1``: no
    zygote, no stand-ins."""
    global _zygote, _stand_ins
    saved = {name: os.environ.get(name) for name in ("PATH", "WD_TESTS_ZYGOTE", "WD_TESTS_REAL_BIN")}
    saved["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    # Idle OpenMP threads sleep (the studies' and the demo's own setting): one start-up
    # setting for every command, so that the zygote serves theirs too.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    path = f"{BIN}:{os.environ['PATH']}"
    if os.environ.get("WD_TESTS_SUBPROCESS") != "1":
        _zygote = Zygote(cli_env())
        _stand_ins = tmp_path_factory.mktemp("cli-shims")
        cli_shim.install(str(_stand_ins), str(BIN), ["python", *sorted(
            p.name for p in BIN.iterdir() if p.name.startswith(("fairseq-", "wd-")) and p.is_file())])
        path = f"{_stand_ins}:{path}"
        os.environ.update(WD_TESTS_ZYGOTE=_zygote.socket, WD_TESTS_REAL_BIN=str(BIN))
    os.environ["PATH"] = path
    yield _zygote
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _zygote is not None:
        _zygote.close()
        _zygote, _stand_ins = None, None


def tool(name: str) -> str:
    """The path a script that stands in for console script ``name`` calls it by: its stand-in
    where the zygote runs, else the script."""
    return str((_stand_ins if _stand_ins is not None else BIN) / name)


def cli_env() -> dict:
    """The environment of run_cli's commands, before their own ``env``."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads cost more than they give
    return env


def run_cli(tool: str, *args, env=None, check=True, cwd=None) -> subprocess.CompletedProcess:
    """Run a console script of this environment (fairseq-train, wd-materialize, ...)."""
    base_env = cli_env()
    full_env = {**base_env, **(env or {})}
    argv = [str(BIN / tool), *map(str, args)]
    server = zygote_for(tool)
    proc = server.run(argv, full_env, cwd) if server and server.serves(full_env) else None
    if proc is None:
        proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def write_toy_corpus(raw: Path, seed: int = 1, n_train: int = 1200) -> None:
    """src: random words; tgt: each word mapped to another word, order reversed."""
    rng = random.Random(seed)
    src_words = [f"s{i}" for i in range(24)]
    mapping = dict(zip(src_words, rng.sample([f"t{i}" for i in range(24)], 24)))
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 60), ("test", 60)):
        src, tgt = [], []
        for _ in range(n):
            words = [rng.choice(src_words) for _ in range(rng.randint(3, 8))]
            src.append(" ".join(words))
            tgt.append(" ".join(mapping[w] for w in reversed(words)))
        (raw / f"{split}.src").write_text("\n".join(src) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(tgt) + "\n")


def bible_subset(base: Path, train: int, max_words: int, valid: int, test: int,
                 pair: str = "es-en") -> Path:
    """Raw text of ``train`` training pairs of at most ``max_words`` words per side (and
    ``valid``, ``test`` pairs) from the shipped Bible corpus, via the demo's own tools;
    ``pair`` en-es reverses the direction. Returns the directory (base/raw)."""
    full, raw = base / "corpus", base / "raw"
    subprocess.run([sys.executable, str(REPO / "examples/bible_es_en/corpus.py"), str(full)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(REPO / "examples/bible_es_en/tools.py"), "subset", "--corpus",
                    str(full), "--out", str(raw), "--train", str(train), "--max-words", str(max_words),
                    "--valid", str(valid), "--test", str(test), "--pair", pair],
                   check=True, capture_output=True)
    return raw


def preprocess(raw: Path, dest: Path, *extra) -> Path:
    run_cli(
        "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", dest, "--workers", "1", *extra,
    )
    return dest


def train_teacher(data: Path, save_dir: Path, *extra, updates: int = 60) -> Path:
    run_cli(
        "fairseq-train", data, "--arch", "transformer", *TEACHER_SHAPE, *TRAIN_FLAGS,
        "--max-update", updates, "--save-dir", save_dir, "--disable-validation", *extra,
    )
    return save_dir / "checkpoint_last.pt"


@pytest.fixture
def one_thread():
    """In-process tiny models on shared cores: extra threads only add overhead."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory ``name`` shared by every pytest-xdist worker of this run: the first
    worker to ask runs ``build(directory)``, the others wait for it (a file lock) and
    reuse the result. Users copy it before changing anything in it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, above popen-gwN
    directory, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build that failed
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def raw_corpus(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "raw", write_toy_corpus)


@pytest.fixture(scope="session")
def data_bin(raw_corpus, tmp_path_factory) -> Path:
    """Separate source and target dictionaries."""
    return built_once(tmp_path_factory, "data-bin", lambda d: preprocess(raw_corpus, d))


@pytest.fixture(scope="session")
def joined_data_bin(raw_corpus, tmp_path_factory) -> Path:
    """One joined dictionary (for --share-all-embeddings)."""
    return built_once(tmp_path_factory, "data-bin-joined",
                      lambda d: preprocess(raw_corpus, d, "--joined-dictionary"))


@pytest.fixture(scope="session")
def postnorm_teacher(data_bin, tmp_path_factory) -> Path:
    """Post-norm, separate embeddings (the authors' teacher, in miniature)."""
    return built_once(tmp_path_factory, "teacher-postnorm",
                      lambda d: train_teacher(data_bin, d)) / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def prenorm_teacher(data_bin, tmp_path_factory) -> Path:
    """Pre-norm, tied decoder input/output embeddings."""
    return built_once(tmp_path_factory, "teacher-prenorm", lambda d: train_teacher(
        data_bin, d, "--encoder-normalize-before", "--decoder-normalize-before",
        "--share-decoder-input-output-embed")) / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def shared_teacher(joined_data_bin, tmp_path_factory) -> Path:
    """All embeddings shared (joined dictionary)."""
    return built_once(tmp_path_factory, "teacher-shared", lambda d: train_teacher(
        joined_data_bin, d, "--share-all-embeddings")) / "checkpoint_last.pt"


def translation_task(data: Path):
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    return TranslationTask.setup_task(
        TranslationConfig(data=str(data), source_lang="src", target_lang="tgt")
    )


def probe_loss(model):
    """A loss whose gradient reaches every generator: a fixed batch (seed 0) through
    ``model`` in training mode, dropout drawn from seed 0 too."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = model.encoder.embed_tokens.num_embeddings
    src = torch.randint(4, vocab, (3, 6), generator=g)
    prev = torch.randint(4, vocab, (3, 5), generator=g)
    model.train()
    torch.manual_seed(0)
    logits = model(src, torch.full((3,), 6), prev)[0].float()
    return logits.logsumexp(-1).mean() + logits.pow(2).mean()


def build_wd(data: Path, teacher: Path, **flags):
    """An in-process phase-1 model (what ``--arch wd_transformer`` + flags builds)."""
    from omegaconf import OmegaConf

    import wd_fairseq  # noqa: F401  (registers the model)
    from wd_fairseq.model import WDTransformerConfig, WDTransformerModel

    cfg = OmegaConf.structured(WDTransformerConfig(teacher_path=str(teacher), **flags))
    return WDTransformerModel.build_model(cfg, translation_task(data))
