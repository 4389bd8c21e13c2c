"""wd-kd-data: the teacher's beam-search translations of the training source become split
train1 of the same data-bin, in corpus order, safely resumable, never half-visible; decoded
by several shard jobs and merged, the same bytes; a subset of the split; an ETA by tokens."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import types

import pytest
import torch

from conftest import BIN, TEACHER_SHAPE, TRAIN_FLAGS, preprocess, run_cli

import wd_fairseq  # noqa: F401
from fairseq.data import Dictionary, data_utils
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from wd_fairseq import kd_decoding
from wd_fairseq.kd_binarize import Split
from wd_fairseq.kd_data import KDJob, build_kd_split
from wd_fairseq.kd_decoding import (EMPTY, FLAGS, LENGTH_RATIO, LOW_SCORE, OK, OVERLONG, PAD, Filters,
                                    classify, teacher_sanity)
from wd_fairseq.kd_split_jobs import decode_shard, merge_shards
from wd_fairseq.teacher import WDSetupError

N_TRAIN = 120
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on shared cores: threads only add overhead


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_bin(raw_corpus, data_bin, tmp_path_factory):
    """The first N_TRAIN training pairs, binarised with the teacher's dictionaries."""
    raw = tmp_path_factory.mktemp("raw-small")
    for split in ("train", "valid", "test"):
        for lang in ("src", "tgt"):
            lines = (raw_corpus / f"{split}.{lang}").read_text().splitlines()
            (raw / f"{split}.{lang}").write_text("\n".join(lines[:N_TRAIN]) + "\n")
    return preprocess(raw, tmp_path_factory.mktemp("bin-small"), "--srcdict",
                      data_bin / "dict.src.txt", "--tgtdict", data_bin / "dict.tgt.txt")


@pytest.fixture
def data(small_bin, tmp_path):
    return shutil.copytree(small_bin, tmp_path / "bin")


def rows(data, split, lang):
    dictionary = Dictionary.load(str(data / f"dict.{lang}.txt"))
    dataset = data_utils.load_indexed_dataset(str(data / f"{split}.src-tgt.{lang}"), dictionary, "mmap")
    return [dataset[i].tolist() for i in range(len(dataset))]


def load_train(data):
    """What fairseq-train loads as 'train' (with --upsample-primary 1)."""
    task = TranslationTask.setup_task(TranslationConfig(
        data=str(data), source_lang="src", target_lang="tgt", train_subset="train",
        dataset_impl="mmap", required_seq_len_multiple=1, upsample_primary=1))
    task.load_dataset("train", combine=True)  # as fairseq-train does
    return task.dataset("train")


class Interrupt(Exception):
    pass


@pytest.fixture
def count_batches(monkeypatch):
    """Counts the teacher's decoding calls; ``interrupt_at(k)`` makes call k fail."""
    state = {"calls": 0, "sentences": 0, "fail_at": None}
    original = TranslationTask.inference_step

    def inference_step(self, generator, models, sample, **kw):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise Interrupt("simulated kill")
        state["sentences"] += len(sample["id"])
        return original(self, generator, models, sample, **kw)

    monkeypatch.setattr(TranslationTask, "inference_step", inference_step)

    def interrupt_at(k):
        state.update(calls=0, sentences=0, fail_at=k)
        return state

    return interrupt_at


def test_cli_writes_train1_in_corpus_order(data, postnorm_teacher, tmp_path):
    out = run_cli("wd-kd-data", data, "--teacher-path", postnorm_teacher, "--cpu",
                  "--engine", "fairseq", env=ONE_THREAD).stdout
    assert "wrote" in out and f"decoded {N_TRAIN}/{N_TRAIN} sentences, 100% of the source " \
        "tokens (" in out  # progress
    assert "tokens/s, ETA 0:00:00)" in out
    for ext in ("bin", "idx"):  # source side: the original sources, byte for byte
        assert (data / f"train1.src-tgt.src.{ext}").read_bytes() == \
            (data / f"train.src-tgt.src.{ext}").read_bytes()
    hyps = (data / "kd-train1" / "train1.tgt").read_text().splitlines()
    assert len(hyps) == N_TRAIN
    tgt_dict = Dictionary.load(str(data / "dict.tgt.txt"))
    assert rows(data, "train1", "tgt") == [
        tgt_dict.encode_line(h, add_if_not_exist=False).tolist() for h in hyps]
    summary = json.loads((data / "kd-train1" / "summary.json").read_text())
    assert summary["counts"][OK] + summary["fallback_to_reference"] == N_TRAIN
    assert summary["manifest"]["beam"] == 6 and summary["manifest"]["lenpen"] == 1.0
    assert summary["engine"] == "fairseq" and summary["quantization"] == "float32"
    assert summary["device"] == "cpu" and summary["sentences_per_second"] > 0
    assert not list((data / "kd-train1").glob("part-*")) and not list(data.glob(".kd-tmp*"))
    sanity = summary["teacher_sanity"]  # reported, with its rates out of the counts
    assert sanity["fallback_rate"] == round(summary["fallback_to_reference"] / N_TRAIN, 4)
    assert sanity["runaway_rate"] == round((summary["counts"][OVERLONG] + summary["counts"]["empty"]) / N_TRAIN, 4)
    assert sanity["length_ratio"] > 0 and "teacher sanity: runaway rate" in out

    # The same sentences as stock fairseq-generate (beam 6, lenpen 1, BPE kept), by id.
    plain = shutil.copytree(data, tmp_path / "plain", ignore=shutil.ignore_patterns("train1*"))
    gen = run_cli("fairseq-generate", plain, "--path", postnorm_teacher, "--gen-subset", "train",
                  "--beam", "6", "--lenpen", "1.0", "--max-len-a", "2", "--max-len-b", "10",
                  "--required-batch-size-multiple", "1", "--cpu", env=ONE_THREAD).stdout
    reference = {int(line.split("\t")[0][2:]): line.split("\t")[2]
                 for line in gen.splitlines() if line.startswith("H-")}
    assert len(reference) == N_TRAIN
    same = sum(reference[i] == hyps[i] for i in range(N_TRAIN))
    assert same >= 0.97 * N_TRAIN, same  # batch composition may flip near-ties

    # fairseq's translation task concatenates train and train1: every source twice
    train = load_train(data)
    assert len(train) == 2 * N_TRAIN
    assert train[N_TRAIN + 5]["target"].tolist() == rows(data, "train1", "tgt")[5]
    assert train[N_TRAIN + 5]["source"].tolist() == train[5]["source"].tolist()

    # Rerun: nothing to do. Other settings: refused unless --overwrite.
    stamp = os.stat(data / "train1.src-tgt.tgt.bin").st_mtime_ns
    job = KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq")
    assert build_kd_split(job) == summary
    assert os.stat(data / "train1.src-tgt.tgt.bin").st_mtime_ns == stamp
    with pytest.raises(WDSetupError, match="train1.src-tgt.src.idx exists .* --overwrite"):
        build_kd_split(KDJob(str(data), str(postnorm_teacher), beam=2, cpu=True, engine="fairseq"))


def test_resumes_after_interrupt_and_restarts_on_new_settings(data, postnorm_teacher, tmp_path,
                                                              count_batches):
    clean = shutil.copytree(data, tmp_path / "clean")
    settings = dict(batch_size=16, save_every=16, cpu=True, engine="fairseq")
    count_batches(None)
    build_kd_split(KDJob(str(clean), str(postnorm_teacher), **settings))

    state = count_batches(5)
    with pytest.raises(Interrupt):
        build_kd_split(KDJob(str(data), str(postnorm_teacher), **settings))
    saved = sum(len(p.read_text().splitlines()) for p in (data / "kd-train1").glob("part-*.tsv"))
    assert 0 < saved <= state["sentences"]  # rows not yet saved are decoded again
    assert not Split(str(data), "train1", "src", "tgt").visible()
    assert len(load_train(data)) == N_TRAIN  # fairseq does not see a partial train1

    state = count_batches(None)
    build_kd_split(KDJob(str(data), str(postnorm_teacher), **settings))
    assert state["sentences"] == N_TRAIN - saved  # only the rest was decoded
    assert rows(data, "train1", "tgt") == rows(clean, "train1", "tgt")
    assert (data / "kd-train1" / "train1.tgt").read_text() == \
        (clean / "kd-train1" / "train1.tgt").read_text()

    # interrupted again, then rerun with another beam: the old shards are dropped
    fresh = shutil.copytree(tmp_path / "clean", tmp_path / "fresh",
                            ignore=shutil.ignore_patterns("train1*", "kd-train1"))
    count_batches(3)
    with pytest.raises(Interrupt):
        build_kd_split(KDJob(str(fresh), str(postnorm_teacher), **settings))
    state = count_batches(None)
    summary = build_kd_split(KDJob(str(fresh), str(postnorm_teacher), beam=2, **settings))
    assert state["sentences"] == N_TRAIN and summary["manifest"]["beam"] == 2


def test_interrupted_write_leaves_no_visible_split(data, postnorm_teacher, monkeypatch,
                                                   count_batches):
    split = Split(str(data), "train1", "src", "tgt")
    placed, original = [], os.replace

    def replace(src, dst):
        if str(dst) in split.files():
            if len(placed) == 2:
                raise Interrupt("killed while renaming")
            placed.append(dst)
        return original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupt):
        build_kd_split(KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq"))
    assert placed == split.files()[:2]  # target side in place, source side not yet
    assert not split.visible() and len(load_train(data)) == N_TRAIN
    monkeypatch.setattr(os, "replace", original)

    state = count_batches(None)
    build_kd_split(KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq"))
    assert state["calls"] == 0  # every sentence was already saved
    assert split.visible() and len(load_train(data)) == 2 * N_TRAIN
    assert not list(data.glob(".kd-tmp*"))


@pytest.mark.parametrize("engine", ["fairseq", "ctranslate2"])
def test_overlong_and_empty_hypotheses_fall_back_to_the_reference(data, postnorm_teacher, engine):
    # a limit of one token: every hypothesis reaches it (fairseq forces EOS there,
    # CTranslate2 cuts one token later)
    summary = build_kd_split(KDJob(str(data), str(postnorm_teacher), max_len_a=0, max_len_b=1,
                                   cpu=True, engine=engine, threads=1))
    assert summary["counts"][OVERLONG] == N_TRAIN == summary["fallback_to_reference"]
    assert rows(data, "train1", "tgt") == rows(data, "train", "tgt")
    # a teacher whose every hypothesis runs away is reported, and warned about
    assert summary["teacher_sanity"] == {"runaway_rate": 1.0, "fallback_rate": 1.0, "length_ratio": None}

    assert classify([], 10) == EMPTY
    assert classify(["t5", "t6"], 3) == OK
    assert classify(["t5", "t6", "t7"], 3) == OVERLONG
    assert classify(["t5", "<blank>"], 3) == PAD


@pytest.mark.parametrize("engine", ["fairseq", "ctranslate2"])
def test_optional_filters_fall_back_and_are_counted(data, postnorm_teacher, tmp_path, engine):
    plain = shutil.copytree(data, tmp_path / "plain")
    summary = build_kd_split(KDJob(str(plain), str(postnorm_teacher), cpu=True, engine=engine,
                                   threads=1))
    assert summary["counts"][LENGTH_RATIO] == summary["counts"][LOW_SCORE] == 0  # off by default
    hyps = (plain / "kd-train1" / "train1.tgt").read_text().splitlines()
    sources = [dataset_row.split() for dataset_row in _texts(data, "src")]
    other_length = sum(len(h.split()) != len(s) for h, s in zip(hyps, sources))
    assert 0 < other_length < N_TRAIN

    # ratio 1: exactly the pairs whose lengths differ fall back
    summary = build_kd_split(KDJob(str(data), str(postnorm_teacher), cpu=True, engine=engine,
                                   threads=1, filters=Filters(max_length_ratio=1.0)))
    assert summary["counts"][LENGTH_RATIO] == other_length
    assert summary["manifest"]["filters"] == {"max_length_ratio": 1.0, "min_score": None}
    # every score is a log-probability: below 0
    summary = build_kd_split(KDJob(str(data), str(postnorm_teacher), cpu=True, engine=engine,
                                   threads=1, filters=Filters(min_score=0.0), overwrite=True))
    assert summary["counts"][LOW_SCORE] == N_TRAIN == summary["fallback_to_reference"]
    assert rows(data, "train1", "tgt") == rows(data, "train", "tgt")
    assert classify(["a"] * 3, 10, 1, -1.0, Filters(max_length_ratio=2.5)) == LENGTH_RATIO
    assert classify(["a"] * 2, 10, 1, -1.0, Filters(max_length_ratio=2.5, min_score=-0.5)) == \
        LOW_SCORE


def _texts(data, lang):
    dictionary = Dictionary.load(str(data / f"dict.{lang}.txt"))
    return [dictionary.string(row) for row in map(torch.tensor, rows(data, "train", lang))]


def test_teacher_sanity_rates_and_warnings():
    counts = dict.fromkeys(FLAGS, 0)
    counts.update({OK: 90, OVERLONG: 5, EMPTY: 1, LOW_SCORE: 4})
    report, warnings = teacher_sanity(counts, hypothesis_tokens=900, reference_tokens=1000)
    assert report == {"runaway_rate": 0.06, "fallback_rate": 0.1, "length_ratio": 0.9}
    assert len(warnings) == 1 and "6.0% of the teacher's hypotheses ran into the length limit" in warnings[0]
    report, warnings = teacher_sanity(dict(counts, **{OVERLONG: 0, EMPTY: 0}), 1400, 1000)
    assert len(warnings) == 1 and "1.40x as long as the references" in warnings[0]


def test_mismatched_line_counts_are_refused(data, postnorm_teacher):
    for ext in ("bin", "idx"):
        shutil.copy(data / f"valid.src-tgt.tgt.{ext}", data / f"train.src-tgt.tgt.{ext}")
    proc = run_cli("wd-kd-data", data, "--teacher-path", postnorm_teacher, "--cpu", check=False,
                   env=ONE_THREAD)  # the default engine (CTranslate2): checked before converting
    assert proc.returncode != 0
    assert f"train.src-tgt.src has {N_TRAIN} sentences" in proc.stderr
    assert "train.src-tgt.tgt has 60" in proc.stderr and "equal line counts" in proc.stderr
    assert not Split(str(data), "train1", "src", "tgt").visible()


def test_missing_split_and_teacher(data, postnorm_teacher, tmp_path):
    with pytest.raises(WDSetupError, match="fairseq-preprocess"):
        build_kd_split(KDJob(str(tmp_path), str(postnorm_teacher)))
    with pytest.raises(WDSetupError, match="--teacher-path .*no such file"):
        build_kd_split(KDJob(str(data), str(tmp_path / "missing.pt"), cpu=True))


# -- beyond one machine: shard jobs and their merge; a subset; the ETA ----------------------

#: Summary fields that record the decoding run (kd_split_jobs), not the data.
RUN_FIELDS = {"decoded_this_run", "decode_seconds", "sentences_per_second", "threads", "devices",
              "shards"}
SHARDED = ["--cpu", "--engine", "fairseq", "--batch-size", "8"]


def kd_files(data):
    return {p.name: p.read_bytes() for p in sorted(data.glob("train1.*"))} | \
        {"train1.tgt": (data / "kd-train1" / "train1.tgt").read_bytes()}


def test_three_shard_jobs_merge_to_the_bytes_of_one_machine(data, postnorm_teacher):
    flags = [data, "--teacher-path", postnorm_teacher, *SHARDED, "--num-shards", "3"]
    jobs = [subprocess.Popen([str(BIN / "wd-kd-data"), *map(str, flags), "--shard-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **ONE_THREAD}) for i in (0, 1)]
    logs = [job.communicate()[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs
    assert "shard 1 of 3 complete" in logs[1] and "wd-kd-data merge" in logs[1]
    assert sorted(p.name for p in (data / "kd-train1").iterdir()) == ["shard-0-of-3", "shard-1-of-3"]

    # merge before shard 2 ran: refused, naming it and the command that finishes it
    proc = run_cli("wd-kd-data", "merge", *flags, check=False, env=ONE_THREAD)
    assert proc.returncode == 1 and not Split(str(data), "train1", "src", "tgt").visible()
    assert f"wd-kd-data merge: error: {data}/kd-train1: 1 of 3 shards not complete (shard 2: not " \
        f"started). Fix: run wd-kd-data {data} --teacher-path {postnorm_teacher} --batch-size 8 " \
        "--cpu --engine fairseq --num-shards 3 --shard-id 2 (a killed job resumes" in proc.stderr

    # a shard job with other settings than the recorded ones: refused before decoding
    with pytest.raises(WDSetupError, match=rf"{data}/kd-train1/shard-0-of-3/manifest\.json: shard 0 "
                       r"of 3 was decoded with beam 6; this job has beam 4 \(--beam\)\. Fix: give "
                       r"every shard job and the merge the same flags, or delete .*shard-\*-of-3"):
        decode_shard(KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq",
                           batch_size=8, beam=4, num_shards=3, shard_id=2))
    with pytest.raises(WDSetupError, match=r"already decoded in 3 shards .* Fix: pass --num-shards 3"):
        decode_shard(KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq",
                           batch_size=8, num_shards=4, shard_id=3))
    assert not (data / "kd-train1" / "shard-2-of-3").exists()

    run_cli("wd-kd-data", *flags, "--shard-id", "2", env=ONE_THREAD)
    # (the engine and device are the shards': the merge may run on another kind of machine)
    out = run_cli("wd-kd-data", "merge", data, "--teacher-path", postnorm_teacher, "--batch-size",
                  "8", "--num-shards", "3", env=ONE_THREAD).stdout
    assert f"({N_TRAIN} sentences;" in out
    merged = kd_files(data)
    summary = json.loads((data / "kd-train1" / "summary.json").read_text())
    assert [s["sentences"] for s in summary["shards"]] and \
        sum(s["sentences"] for s in summary["shards"]) == N_TRAIN
    assert sorted(p.name for p in (data / "kd-train1").iterdir()) == ["summary.json", "train1.tgt"]

    # one machine, same settings: the merged split is up to date; decoded again, the same bytes
    job = KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq", batch_size=8)
    assert build_kd_split(job) == summary
    one = build_kd_split(dataclasses.replace(job, overwrite=True))
    assert kd_files(data) == merged
    assert {k: v for k, v in one.items() if k not in RUN_FIELDS} == \
        {k: v for k, v in summary.items() if k not in RUN_FIELDS}


def test_a_killed_shard_job_resumes_and_unfinished_shards_are_named(data, postnorm_teacher,
                                                                    tmp_path, count_batches):
    settings = dict(cpu=True, engine="fairseq", batch_size=8, save_every=8, num_shards=3)
    clean = shutil.copytree(data, tmp_path / "clean")
    count_batches(None)
    build_kd_split(KDJob(str(clean), str(postnorm_teacher), cpu=True, engine="fairseq",
                         batch_size=8))

    decode_shard(KDJob(str(data), str(postnorm_teacher), shard_id=0, **settings))
    state = count_batches(3)
    with pytest.raises(Interrupt):
        decode_shard(KDJob(str(data), str(postnorm_teacher), shard_id=1, **settings))
    shard = data / "kd-train1" / "shard-1-of-3"
    saved = sum(len(p.read_text().splitlines()) for p in shard.glob("part-*.tsv"))
    assert 0 < saved <= state["sentences"] and not (shard / "complete.json").exists()
    with pytest.raises(WDSetupError, match=r"2 of 3 shards not complete \(shard 1: "
                       rf"{saved} sentences saved, not finished; shard 2: not started\)\. Fix: run "
                       r"for I in 1 2; do wd-kd-data .* --num-shards 3 --shard-id \$I; done"):
        merge_shards(KDJob(str(data), str(postnorm_teacher), **settings))

    state = count_batches(None)
    record = decode_shard(KDJob(str(data), str(postnorm_teacher), shard_id=1, **settings))
    assert state["sentences"] == record["sentences"] - saved  # only the rest was decoded
    decode_shard(KDJob(str(data), str(postnorm_teacher), shard_id=2, **settings))
    with pytest.raises(WDSetupError, match=r"shard-0-of-3/manifest\.json: shard 0 of 3 was decoded "
                       r"with lenpen 1\.0; this merge has lenpen 0\.5 \(--lenpen\)\. Fix: pass the "
                       r"merge the shard jobs' flags"):
        merge_shards(KDJob(str(data), str(postnorm_teacher), lenpen=0.5, **settings))
    state = count_batches(None)
    assert decode_shard(KDJob(str(data), str(postnorm_teacher), shard_id=2, **settings)) \
        == json.loads((data / "kd-train1" / "shard-2-of-3" / "complete.json").read_text())
    assert state["calls"] == 0  # a finished shard is not decoded again
    merge_shards(KDJob(str(data), str(postnorm_teacher), **settings))
    assert kd_files(data) == kd_files(clean)


def test_limit_writes_both_sides_of_the_first_k_sentences(data, postnorm_teacher, tmp_path,
                                                          count_batches):
    k = 50
    run_cli("wd-kd-data", data, "--teacher-path", postnorm_teacher, "--cpu", "--engine",
            "fairseq", "--limit", k, env=ONE_THREAD)
    assert rows(data, "train1", "src") == rows(data, "train", "src")[:k]
    assert len(rows(data, "train1", "tgt")) == k
    assert len((data / "kd-train1" / "train1.tgt").read_text().splitlines()) == k
    summary = json.loads((data / "kd-train1" / "summary.json").read_text())
    assert summary["sentences"] == k and summary["manifest"]["limit"] == k
    train = load_train(data)
    assert len(train) == N_TRAIN + k
    assert train[N_TRAIN + 7]["source"].tolist() == train[7]["source"].tolist()
    assert train[N_TRAIN + 7]["target"].tolist() == rows(data, "train1", "tgt")[7]
    out = run_cli("fairseq-train", data, "--arch", "transformer", *TEACHER_SHAPE, *TRAIN_FLAGS,
                  "--max-update", "1", "--upsample-primary", "1", "--disable-validation",
                  "--no-save", "--save-dir", tmp_path / "student", "--cpu").stdout
    assert f"train1 src-tgt {k} examples" in out and "done training" in out

    # an interrupted run resumed with another limit restarts cleanly
    fresh = shutil.copytree(data, tmp_path / "fresh", ignore=shutil.ignore_patterns("train1*", "kd-*"))
    count_batches(2)
    with pytest.raises(Interrupt):
        build_kd_split(KDJob(str(fresh), str(postnorm_teacher), cpu=True, engine="fairseq",
                             batch_size=8, save_every=8, limit=k))
    state = count_batches(None)
    summary = build_kd_split(KDJob(str(fresh), str(postnorm_teacher), cpu=True, engine="fairseq",
                                   batch_size=8, save_every=8, limit=30))
    assert state["sentences"] == 30 == summary["sentences"] and summary["manifest"]["limit"] == 30
    # a limit of the whole split or more is no limit: the split of a run without one
    summary = build_kd_split(KDJob(str(fresh), str(postnorm_teacher), cpu=True, engine="fairseq",
                                   limit=10 * N_TRAIN, overwrite=True))
    assert "limit" not in summary["manifest"] and summary["sentences"] == N_TRAIN
    assert (fresh / "train1.src-tgt.src.bin").read_bytes() == \
        (fresh / "train.src-tgt.src.bin").read_bytes()


def test_eta_counts_source_tokens_not_sentences(monkeypatch, caplog):
    """Half the sentences but a fifth of the source tokens done in 10 s: 40 s left, not 10."""
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(kd_decoding, "time", types.SimpleNamespace(time=lambda: next(clock)))
    caplog.set_level(logging.INFO, logger="wd_fairseq.kd_decoding")
    progress = kd_decoding.Progress(100, 1000)
    monkeypatch.setattr(kd_decoding, "PROGRESS_SECONDS", 5)
    progress.update(50, 200)
    assert caplog.messages == ["decoded 50/100 sentences, 20% of the source tokens "
                               "(5.0 sentences/s, 20 tokens/s, ETA 0:00:40)"]
    assert kd_decoding.eta_seconds(200, 1000, 10.0) == 40.0
    assert kd_decoding.eta_seconds(1000, 1000, 10.0) == 0.0
    assert kd_decoding.eta_seconds(0, 1000, 10.0) == float("inf")
