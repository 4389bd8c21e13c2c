"""wd-kd-data's engines: CTranslate2 decodes what fairseq decodes, and both resume
after a kill to the same bytes; a conversion or shards made for another teacher, beam
or quantization are never reused."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from unittest import mock

import ctranslate2
import numpy as np
import pytest
import torch

from conftest import REPO, run_cli

from fairseq.data import indexed_dataset
from wd_fairseq import kd_decoding
from wd_fairseq.kd_binarize import MMapWriter
from wd_fairseq.kd_data import KDJob, build_kd_split
from wd_fairseq.teacher import WDSetupError

pytestmark = pytest.mark.usefixtures("one_thread")

#: Settings of every in-process run here: the CPU, one thread.
CPU = dict(cpu=True, threads=1)


@pytest.fixture
def data(data_bin, tmp_path):
    """A copy of the toy data-bin (1,200 training pairs)."""
    return shutil.copytree(data_bin, tmp_path / "bin")


def kd_text(data):
    return (data / "kd-train1" / "train1.tgt").read_text().splitlines()


def train1_bytes(data):
    return {p.name: p.read_bytes() for p in sorted(data.glob("train1.*"))}


def test_float32_greedy_equals_the_fairseq_engine(data, postnorm_teacher, tmp_path):
    fairseq_bin = shutil.copytree(data, tmp_path / "fairseq")
    reference = build_kd_split(KDJob(str(fairseq_bin), str(postnorm_teacher), beam=1,
                                     engine="fairseq", **CPU))
    summary = build_kd_split(KDJob(str(data), str(postnorm_teacher), beam=1, engine="ctranslate2",
                                   quantization="float32", **CPU))
    assert train1_bytes(data) == train1_bytes(fairseq_bin)  # token for token
    assert summary["engine"] == "ctranslate2" and summary["quantization"] == "float32"
    assert summary["device"] == "cpu" and summary["devices"] == [0] and summary["threads"] == 1
    assert summary["sentences_per_second"] > 0 and summary["counts"] == reference["counts"]
    assert (data / "kd-train1" / "ct2-float32" / "model.bin").exists()


@pytest.mark.parametrize("beam", [4, 6])
def test_beam_search_agrees_and_the_rest_is_explained(data, postnorm_teacher, tmp_path, beam):
    """Top hypotheses agree on >= 95% of sentences. Where they differ, each engine's
    choice is the better one under its own scores: fairseq's log-probabilities, and
    CTranslate2's, which add -log(1 - p(EOS at step 1)) to every hypothesis (it
    renormalises after forbidding EOS there; see kd_decoding)."""
    fairseq_bin = shutil.copytree(data, tmp_path / "fairseq")
    build_kd_split(KDJob(str(fairseq_bin), str(postnorm_teacher), beam=beam, engine="fairseq",
                         **CPU))
    build_kd_split(KDJob(str(data), str(postnorm_teacher), beam=beam, engine="ctranslate2",
                         quantization="float32", **CPU))
    ours, theirs = kd_text(data), kd_text(fairseq_bin)
    differ = [i for i in range(len(ours)) if ours[i] != theirs[i]]
    assert len(differ) <= 0.05 * len(ours), len(differ)

    # CTranslate2 float32 scores are fairseq's log-probabilities (tests/test_ctranslate2.py)
    scorer = ctranslate2.Translator(str(data / "kd-train1" / "ct2-float32"), intra_threads=1)
    sources = [line.split() for line in _raw_sources(data).splitlines()]
    picked = [sources[i] for i in differ]
    fairseq_lp = scorer.score_batch(picked, [theirs[i].split() for i in differ])
    ct2_lp = scorer.score_batch(picked, [ours[i].split() for i in differ])
    first_eos = scorer.score_batch(picked, [[] for _ in differ])
    for i, f, c, e in zip(differ, fairseq_lp, ct2_lp, first_eos):
        shift = -math.log1p(-math.exp(e.log_probs[0]))
        fairseq_score = (sum(f.log_probs) / len(f.log_probs), sum(c.log_probs) / len(c.log_probs))
        ct2_score = ((sum(f.log_probs) + shift) / len(f.log_probs),
                     (sum(c.log_probs) + shift) / len(c.log_probs))
        assert fairseq_score[0] >= fairseq_score[1] - 1e-4, (i, fairseq_score)
        assert ct2_score[1] >= ct2_score[0] - 1e-4, (i, ct2_score)


def _raw_sources(data) -> str:
    """The training sources as text, read back from the data-bin."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(data / "dict.src.txt"))
    dataset = data_utils.load_indexed_dataset(str(data / "train.src-tgt.src"), dictionary, "mmap")
    return "".join(dictionary.string(dataset[i]) + "\n" for i in range(len(dataset)))


KILLER = """
import os, signal, sys
from wd_fairseq import export_ctranslate2, kd_data, kd_shards
where, after = sys.argv[1], int(sys.argv[2])
calls = [0]

def kill_after(original):
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if where == "save":
    kd_shards.ShardStore.save = kill_after(kd_shards.ShardStore.save)
else:  # "convert": killed after the export, before it is marked finished
    export_ctranslate2.export = kill_after(export_ctranslate2.export)
kd_data.cli_main(sys.argv[3:])
"""


def run_killed(where: str, after: int, *argv):
    """wd-kd-data ARGV, SIGKILLed right after the ``after``-th shard save or conversion."""
    proc = subprocess.run([sys.executable, "-c", KILLER, where, str(after), *map(str, argv)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("engine", ["fairseq", "ctranslate2"])
def test_killed_run_resumes_to_the_same_bytes(data, postnorm_teacher, tmp_path, engine):
    flags = ["--teacher-path", postnorm_teacher, "--engine", engine, "--cpu", "--threads", 1,
             "--batch-size", 16, "--save-every", 100]
    clean = shutil.copytree(data, tmp_path / "clean")
    run_cli("wd-kd-data", clean, *flags)

    run_killed("save", 3, data, *flags)
    shards = list((data / "kd-train1").glob("part-*.tsv"))
    assert len(shards) == 3 and not (data / "train1.src-tgt.src.idx").exists()
    out = run_cli("wd-kd-data", data, *flags).stdout
    assert "decoding" in out and "of 1200 sentences" in out
    assert train1_bytes(data) == train1_bytes(clean)
    assert kd_text(data) == kd_text(clean)


def test_killed_conversion_is_never_reused(data, postnorm_teacher):
    flags = ["--teacher-path", postnorm_teacher, "--engine", "ctranslate2", "--cpu",
             "--threads", 1]
    run_killed("convert", 1, data, *flags)
    work = data / "kd-train1"
    assert (work / "ct2-int8.tmp" / "model.bin").exists()  # converted, never marked finished
    assert not (work / "ct2-int8").exists()
    out = run_cli("wd-kd-data", data, *flags).stdout
    assert "wrote" in out
    assert not (work / "ct2-int8.tmp").exists()
    assert json.loads((work / "ct2-int8" / "wd-cache.json").read_text())["key"]["quantization"] \
        == "int8"


class Interrupt(Exception):
    pass


def test_teacher_beam_and_quantization_invalidate_cache_and_shards(
        data, postnorm_teacher, prenorm_teacher, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="wd_fairseq.kd_shards")
    teacher = tmp_path / "teacher.pt"
    shutil.copy(postnorm_teacher, teacher)
    work = data / "kd-train1"
    collect = kd_decoding.CTranslate2Engine._collect
    batches = {"n": 0, "fail_at": None}

    def counting_collect(self, batch, results):
        batches["n"] += 1
        if batches["n"] == batches["fail_at"]:
            raise Interrupt("simulated kill")
        return collect(self, batch, results)

    monkeypatch.setattr(kd_decoding.CTranslate2Engine, "_collect", counting_collect)

    def interrupted(**settings):
        """Shard contents after a run killed at its 4th batch; whether it restarted."""
        batches.update(n=0, fail_at=4)
        caplog.clear()
        with pytest.raises(Interrupt):
            build_kd_split(KDJob(str(data), str(teacher), batch_size=16, save_every=16,
                                 engine="ctranslate2", **CPU, **settings))
        batches.update(fail_at=None)
        restarted = "earlier shards were made with other settings; restarting" in caplog.text
        return [p.read_text() for p in sorted(work.glob("part-*.tsv"))], restarted

    shards, _ = interrupted()
    assert shards
    marker = json.loads((work / "ct2-int8" / "wd-cache.json").read_text())
    model = work / "ct2-int8" / "model.bin"
    converted = model.stat().st_mtime_ns

    # same settings: the shards are kept and extended, the conversion reused
    again, restarted = interrupted()
    assert not restarted and again[:len(shards)] == shards and len(again) > len(shards)
    assert model.stat().st_mtime_ns == converted

    # another beam: the shards go, the conversion stays
    assert interrupted(beam=2)[1]
    assert json.loads((work / "manifest.json").read_text())["beam"] == 2
    assert model.stat().st_mtime_ns == converted

    # another quantization: its own conversion, new shards
    assert interrupted(beam=2, quantization="float32")[1]
    assert json.loads((work / "manifest.json").read_text())["quantization"] == "float32"
    assert (work / "ct2-float32" / "wd-cache.json").exists()

    # another teacher file at the same path: reconverted, shards dropped
    shutil.copy(prenorm_teacher, teacher)
    assert interrupted(beam=2, quantization="float32")[1]
    new = json.loads((work / "ct2-float32" / "wd-cache.json").read_text())
    assert new["key"]["checkpoint"]["sha256"] != marker["key"]["checkpoint"]["sha256"]
    assert json.loads((work / "manifest.json").read_text())["teacher"]["sha256"] == \
        new["key"]["checkpoint"]["sha256"]
    summary = build_kd_split(KDJob(str(data), str(teacher), batch_size=16, save_every=16, beam=2,
                                   engine="ctranslate2", quantization="float32", **CPU))
    assert summary["manifest"]["teacher"]["sha256"] == new["key"]["checkpoint"]["sha256"]


def test_automatic_engine_falls_back_when_the_converter_refuses(data, postnorm_teacher, tmp_path):
    state = torch.load(postnorm_teacher, map_location="cpu", weights_only=False)
    state["cfg"]["model"].decoder_attention_heads = 2  # same shapes; CTranslate2 refuses
    teacher = tmp_path / "two-heads.pt"
    torch.save(state, teacher)
    summary = build_kd_split(KDJob(str(data), str(teacher), **CPU))
    assert summary["engine"] == "fairseq"
    with pytest.raises(WDSetupError, match="--teacher-path .*4 encoder and 2 decoder"):
        build_kd_split(KDJob(str(data), str(teacher), engine="ctranslate2", overwrite=True, **CPU))
    with pytest.raises(WDSetupError, match="--quantization float16: not available on the cpu"):
        build_kd_split(KDJob(str(data), str(postnorm_teacher), quantization="float16",
                             overwrite=True, **CPU))


def test_streaming_writer_writes_fairseq_mmap_bytes(tmp_path):
    rng = np.random.default_rng(1)
    rows = [torch.from_numpy(rng.integers(0, 40000, size=rng.integers(1, 30)))
            for _ in range(5000)]
    ours = MMapWriter(str(tmp_path / "ours.bin"), vocab_size=40000)
    theirs = indexed_dataset.make_builder(str(tmp_path / "theirs.bin"), "mmap", vocab_size=40000)
    for row in rows:
        ours.add_item(row)
        theirs.add_item(row)
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.bin", "ours.idx", "theirs.bin",
                                                         "theirs.idx"]


def test_two_fairseq_processes_write_what_one_writes(data, postnorm_teacher, tmp_path):
    """Two CPU processes stand in for two GPUs: every other batch of the same plan each."""
    one = shutil.copytree(data, tmp_path / "one")
    settings = dict(engine="fairseq", batch_size=16, save_every=16, **CPU)
    build_kd_split(KDJob(str(one), str(postnorm_teacher), **settings))
    summary = build_kd_split(KDJob(str(data), str(postnorm_teacher), workers=2, **settings))
    assert train1_bytes(data) == train1_bytes(one) and kd_text(data) == kd_text(one)
    assert summary["devices"] == [0, 1]
    with pytest.raises(WDSetupError, match="--workers 2: for --engine fairseq"):
        build_kd_split(KDJob(str(data), str(postnorm_teacher), engine="ctranslate2", workers=2,
                             overwrite=True, **CPU))


def test_speed_benchmark_chunks_cover_the_split_and_rows_sum_them(data_bin, tmp_path):
    """benchmarks/kd_data_speed.py --chunks: consecutive chunks hold the split exactly once;
    an engine's row adds up sentences, times and fallbacks, its rate is total sentences
    over total decoding time and its peak RSS the largest."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import kd_data_speed

    whole = indexed_dataset.MMapIndexedDataset(str(data_bin / "train.src-tgt.src"))
    parts = kd_data_speed.chunk_bins(data_bin, "train", len(whole), 7, tmp_path / "bin")
    assert [p.name for p in parts] == [f"bin-chunk{c}of7" for c in range(1, 8)]
    sizes = [len(indexed_dataset.MMapIndexedDataset(str(p / "train.src-tgt.src"))) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for side in ("src", "tgt"):
        pieces = [indexed_dataset.MMapIndexedDataset(str(p / f"train.src-tgt.{side}")) for p in parts]
        original = indexed_dataset.MMapIndexedDataset(str(data_bin / f"train.src-tgt.{side}"))
        assert [t.tolist() for p in pieces for t in p] == [t.tolist() for t in original]
    assert (parts[0] / "test.src-tgt.src.bin").resolve() == (data_bin / "test.src-tgt.src.bin").resolve()

    chunks = [dict(sentences=300, engine="e", seconds=12.0, decode_seconds=10.0,
                   sentences_per_second=30.0, peak_rss_mib=500.0, fallback=1),
              dict(sentences=100, engine="e", seconds=6.0, decode_seconds=5.0,
                   sentences_per_second=20.0, peak_rss_mib=600.0, fallback=2)]
    row = kd_data_speed.sum_chunks(chunks)
    assert (row["sentences"], row["seconds"], row["decode_seconds"], row["fallback"]) == (
        400, 18.0, 15.0, 3)
    assert row["sentences_per_second"] == round(400 / 15, 2) and row["peak_rss_mib"] == 600.0
    assert row["chunk_sentences_per_second"] == [30.0, 20.0]
    failed = dict(sentences=None, engine="e", error="no GPU")
    assert kd_data_speed.sum_chunks([chunks[0], failed]) == failed


def teacher_loads(path, calls):
    """torch.load, counting into ``calls`` the loads of the file ``path``."""
    real = torch.load

    def load(f, *args, **kwargs):
        if os.path.realpath(str(getattr(f, "name", f))) == os.path.realpath(str(path)):
            calls.append(1)
        return real(f, *args, **kwargs)
    return mock.patch.object(torch, "load", load)


@pytest.mark.parametrize("engine", ["ctranslate2", "fairseq"])
def test_each_tool_loads_the_teacher_once(data, postnorm_teacher, tmp_path, engine):
    """wd-kd-data (either engine: the check, the disk estimate, the conversion or the
    model share one read), wd-export-ct2 and wd-init-student load the teacher file once."""
    from wd_fairseq import export_ctranslate2, init_student

    runs = {"wd-kd-data": lambda: build_kd_split(KDJob(str(data), str(postnorm_teacher), beam=1,
                                                       engine=engine, **CPU))}
    if engine == "fairseq":  # (the other tools once)
        runs["wd-export-ct2"] = lambda: export_ctranslate2.export(
            str(postnorm_teacher), str(tmp_path / "ct2"), str(data), "float32")
        runs["wd-init-student"] = lambda: init_student.init_student(
            str(postnorm_teacher), str(tmp_path / "s.pt"), {"decoder_layers": 1}, data=str(data))
    for tool, run in runs.items():
        calls = []
        with teacher_loads(postnorm_teacher, calls):
            run()
        assert len(calls) == 1, tool
