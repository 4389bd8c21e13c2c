"""The demo's and the benchmark's own helpers (examples/bible_es_en/tools.py, the argument
handling of examples/demo.sh) on tiny fake inputs; the demo itself is not run here."""

import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from sacrebleu.metrics import BLEU

from conftest import REPO

spec = importlib.util.spec_from_file_location("bible_tools", REPO / "examples/bible_es_en/tools.py")
tools = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tools)

REFS = ["the cat sat on the mat", "a dog ran in the park today", "he said unto them go",
        "and there was light", "in the beginning god created the heavens", "she is here now"] * 5
# KD: damaged copies of the references; WD: the references themselves
KD_HYPS = [" ".join(r.split()[:-2]) for r in REFS]


def test_spread_takes_evenly_spaced_items():
    assert tools.spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert tools.spread([3, 4], 5) == [3, 4]


def test_subset_keeps_short_aligned_pairs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 20), ("valid", 6), ("test", 6)):
        (corpus / f"{split}.es").write_text("".join(f"es{i} " * (i % 7 + 1) + "\n" for i in range(n)))
        (corpus / f"{split}.en").write_text("".join(f"en{i} " * (i % 5 + 1) + "\n" for i in range(n)))
    tools.main(["subset", "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--train", "4",
                "--max-words", "3", "--valid", "2"])
    es = (tmp_path / "out/train.es").read_text().splitlines()
    en = (tmp_path / "out/train.en").read_text().splitlines()
    assert len(es) == len(en) == 4
    for s, t in zip(es, en):
        assert s.split()[0][2:] == t.split()[0][2:]  # still aligned
        assert max(len(s.split()), len(t.split())) <= 3
    assert len((tmp_path / "out/valid.es").read_text().splitlines()) == 2
    assert len((tmp_path / "out/test.en").read_text().splitlines()) == 6


def test_bleu_statistics_reproduce_sacrebleu():
    stats = tools.bleu_statistics(KD_HYPS, REFS, "en")
    assert stats.shape == (len(REFS), 10)
    expected = BLEU(trg_lang="en").corpus_score(KD_HYPS, [REFS]).score
    assert tools.corpus_bleu(stats.sum(0)) == pytest.approx(expected, abs=1e-9)


def test_paired_bootstrap():
    kd, wd = tools.bleu_statistics(KD_HYPS, REFS, "en"), tools.bleu_statistics(REFS, REFS, "en")
    diffs = tools.paired_bootstrap([(kd, wd), (kd, kd)], samples=200, seed=1)
    assert diffs.shape == (200, 2)
    assert np.all(diffs[:, 0] > 0) and np.all(diffs[:, 1] == 0)
    assert np.array_equal(diffs, tools.paired_bootstrap([(kd, wd), (kd, kd)], samples=200, seed=1))
    better = tools.interval(5.0, diffs[:, 0])
    assert better["ci95"][0] > 0 and better["resamples_wd_not_better"] == 0
    assert tools.verdict(better).startswith("WD better")
    assert tools.verdict(tools.interval(0.0, diffs[:, 1])).startswith("no clear difference")
    assert tools.verdict(tools.interval(-5.0, -diffs[:, 0])).startswith("KD better")


def fake_checkpoint(path, enc, dec):
    path.parent.mkdir(parents=True, exist_ok=True)
    shared = torch.zeros(dec, 2)
    torch.save({"model": {"encoder.version": torch.tensor([3.0]), "encoder.w": torch.zeros(enc),
                          "decoder.embed_tokens.weight": shared,
                          "decoder.output_projection.weight": shared,  # tied: counted once
                          "decoder.embed_positions._float_tensor": torch.zeros(1)}}, path)


def fake_run(work, bleu_shift=0.0, lang="en", refs=REFS, kd_hyps=KD_HYPS):
    """A pipeline.sh work directory with results.json, checkpoints, hypotheses, references
    (target language ``lang``)."""
    speeds = {"teacher": 10.0, "kd_student": 25.0, "wd_phase1": 24.0, "wd_student": 26.0}
    hyps = {"teacher": refs, "kd_student": kd_hyps, "wd_phase1": kd_hyps, "wd_student": refs}
    rows = []
    for model, _ in tools.MODELS:
        fake_checkpoint(work / tools.CHECKPOINTS[model], 5, 3 if model == "teacher" else 1)
        (work / "eval").mkdir(parents=True, exist_ok=True)
        (work / "eval" / f"{model}.test.hyp").write_text("".join(h + "\n" for h in hyps[model]))
        rows.append({"model": model, "test_set": "test", "target_lang": lang, "chrf": 50.0,
                     "sentences_per_second": speeds[model],
                     "sacrebleu": round(BLEU(trg_lang=lang).corpus_score(hyps[model], [refs]).score, 2)
                     + bleu_shift, "speedup_vs_teacher": round(speeds[model] / 10.0, 2),
                     "sacrebleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
                     "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"})
    (work / "raw").mkdir(parents=True, exist_ok=True)
    (work / "raw" / f"test.{lang}").write_text("".join(r + "\n" for r in refs))
    (work / "results.json").write_text(json.dumps({"rows": rows}))
    return work


def test_report_writes_table_json_and_plot(tmp_path):
    work = fake_run(tmp_path / "work")
    prefix = str(tmp_path / "demo_results")
    tools.main(["report", "--work", str(work), "--out-prefix", prefix, "--title", "T", "--note", "extra"])
    doc = json.loads(open(prefix + ".json").read())
    assert [r["label"] for r in doc["rows"]] == [label for _, label in tools.MODELS]
    teacher, kd = doc["rows"][0], doc["rows"][1]
    assert (teacher["parameters"], teacher["decoder_parameters"]) == (11, 6)
    assert (kd["parameters"], kd["decoder_parameters"]) == (7, 2)
    md = open(prefix + ".md").read()
    assert "| KD student | " in md and "| 2.50x |" in md and "tok:13a" in md and "- extra" in md
    assert "test set: 30 sentences" in md
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_two_runs(tmp_path):
    runs = [fake_run(tmp_path / "s1"), fake_run(tmp_path / "s2")]
    prefix = str(tmp_path / "results")
    tools.main(["compare", "--work", f"seed1={runs[0]}", f"seed2={runs[1]}", "--out-prefix", prefix,
                "--samples", "100"])
    doc = json.loads(open(prefix + ".json").read())
    assert [r["run"] for r in doc["comparison"]] == ["seed1", "seed2", "mean of 2 runs"]
    for r in doc["comparison"]:
        assert r["wd_minus_kd"] > 0 and r["ci95"][0] > 0 and r["wd"] == 100.0
    # one teacher row, then KD and WD of every run
    assert [r["label"] for r in doc["rows"]] == [
        "teacher (seed1)", "KD student (seed1)", "WD student (seed1)", "KD student (seed2)", "WD student (seed2)"]
    assert "WD better than KD" in open(prefix + ".md").read()
    assert os.path.getsize(prefix + ".png") > 0


def test_compare_scores_each_run_in_its_own_target_language(tmp_path):
    """A reversed pair (en -> es): references are raw/test.es, BLEU uses the run's language;
    a run that does not say its language is refused."""
    refs = ["el gato se sentó en la alfombra", "y hubo luz", "en el principio creó dios los cielos",
            "ella está aquí ahora", "dijo a ellos id", "un perro corrió en el parque hoy"] * 5
    kd = [" ".join(r.split()[:-1]) for r in refs]
    runs = [fake_run(tmp_path / f"s{i}", lang="es", refs=refs, kd_hyps=kd) for i in (1, 2)]
    prefix = str(tmp_path / "results")
    tools.main(["compare", "--work", f"a={runs[0]}", f"b={runs[1]}", "--out-prefix", prefix,
                "--samples", "50"])
    doc = json.loads(open(prefix + ".json").read())
    expected = 100.0 - BLEU(trg_lang="es").corpus_score(kd, [refs]).score
    assert doc["comparison"][0]["wd_minus_kd"] == pytest.approx(expected, abs=0.01)
    document = json.loads((runs[0] / "results.json").read_text())
    for row in document["rows"]:
        del row["target_lang"]
    (runs[0] / "results.json").write_text(json.dumps(document))
    with pytest.raises(SystemExit, match="no target_lang"):
        tools.main(["compare", "--work", f"a={runs[0]}", "--out-prefix", prefix])


def test_demo_arguments(tmp_path):
    def demo(*args, work):
        return subprocess.run(["bash", str(REPO / "examples/demo.sh"), *args], capture_output=True,
                              text=True, env=dict(os.environ, WORK=str(work)))

    assert demo("--bogus", work=tmp_path).returncode == 2
    assert "--fresh" in demo("--help", work=tmp_path).stdout
    proc = demo("--fresh", work=tmp_path)  # not a demo directory: refused, nothing deleted
    assert proc.returncode == 1 and "not made by demo.sh" in proc.stderr and tmp_path.exists()


def test_paired_compares_models_of_different_runs(tmp_path):
    """KD students of two runs (e.g. two kinds of KD data): each system against the base on
    the same resamples; runs scored on other references are refused."""
    worse = [" ".join(h.split()[:-1]) for h in KD_HYPS]
    base, same, better, other = (fake_run(tmp_path / "base"), fake_run(tmp_path / "same"),
                                 fake_run(tmp_path / "better", kd_hyps=REFS),
                                 fake_run(tmp_path / "worse", kd_hyps=worse))
    prefix = str(tmp_path / "paired")
    tools.main(["paired", "--base", f"a={base}:kd_student", "--system", f"b={same}:kd_student",
                f"c={better}:kd_student", f"d={other}:kd_student", "--out-prefix", prefix,
                "--samples", "100"])
    doc = json.loads(open(prefix + ".json").read())
    same_row, better_row, worse_row = doc["comparison"]
    assert same_row["minus_base"] == 0 and same_row["ci95"] == [0, 0]
    expected = 100.0 - BLEU().corpus_score(KD_HYPS, [REFS]).score
    assert better_row["minus_base"] == pytest.approx(expected, abs=0.01) and better_row["ci95"][0] > 0
    assert worse_row["ci95"][1] < 0 and worse_row["resamples_not_better"] == 1
    assert "| c | 100.00 |" in open(prefix + ".md").read()
    shifted = fake_run(tmp_path / "shifted", refs=[r + " amen" for r in REFS])
    with pytest.raises(SystemExit, match="test references differ"):
        tools.main(["paired", "--base", f"a={base}:kd_student", "--system", f"b={shifted}:kd_student",
                    "--out-prefix", prefix])
    with pytest.raises(SystemExit, match="expected LABEL=WORK:MODEL"):
        tools.main(["paired", "--base", f"a={base}", "--system", f"b={same}:kd_student",
                    "--out-prefix", prefix])
    with pytest.raises(SystemExit, match="no scores of sel_student"):
        tools.main(["paired", "--base", f"a={base}:sel_student", "--system", f"b={same}:kd_student",
                    "--out-prefix", prefix])
