"""Multilingual teachers (fairseq's translation_multi_simple_epoch task, one joined
dictionary with __xx__ language tokens): a tiny es<->en teacher trained here with stock
fairseq-train on the shipped Bible corpus, WD phase 1 for every direction, the
materialised student decoded by stock fairseq without the plugin."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TRAIN_FLAGS, USER_DIR, bible_subset, run_cli
from test_pipeline import hypotheses

PAIRS = ["es-en", "en-es"]
#: the task flags of the teacher, the students and decoding (M2M-100's recipe, in small)
TASK = ["--task", "translation_multi_simple_epoch", "--lang-pairs", ",".join(PAIRS),
        "--encoder-langtok", "src", "--decoder-langtok", "--langs", "es,en"]
TEACHER = ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
           "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
           "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
           "--encoder-normalize-before", "--decoder-normalize-before", "--share-all-embeddings"]
STUDENT = ["--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
           "--decoder-attention-heads", "4"]


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    """(data-bin, fixed dictionary, teacher): 600 Bible verse pairs in each direction,
    joint BPE, one dictionary; the teacher trained 300 updates on both directions."""
    base = tmp_path_factory.mktemp("multilingual")
    raw = bible_subset(base, train=600, max_words=15, valid=30, test=30)
    codes = base / "codes"
    joint = "".join((raw / f"train.{lang}").read_text(encoding="utf-8") for lang in ("es", "en"))
    with open(codes, "w", encoding="utf-8") as out:
        subprocess.run([sys.executable, "-m", "subword_nmt.learn_bpe", "-s", "200"], input=joint,
                       stdout=out, check=True, text=True)
    for split in ("train", "valid", "test"):
        for lang in ("es", "en"):
            with open(raw / f"{split}.{lang}", encoding="utf-8") as inp, \
                    open(base / f"bpe.{split}.{lang}", "w", encoding="utf-8") as out:
                subprocess.run([sys.executable, "-m", "subword_nmt.apply_bpe", "-c", str(codes)],
                               stdin=inp, stdout=out, check=True)
    data = base / "data-bin"
    prefixes = [f"--{split}pref" if split != "train" else "--trainpref" for split in ("train", "valid", "test")]
    splits = [a for p, s in zip(prefixes, ("train", "valid", "test")) for a in (p, base / f"bpe.{s}")]
    run_cli("fairseq-preprocess", "-s", "es", "-t", "en", *splits, "--joined-dictionary",
            "--destdir", data, "--workers", "1")
    run_cli("fairseq-preprocess", "-s", "en", "-t", "es", *splits, "--srcdict", data / "dict.en.txt",
            "--tgtdict", data / "dict.es.txt", "--destdir", data, "--workers", "1")
    fixed = data / "dict.es.txt"
    teacher = base / "teacher"
    run_cli("fairseq-train", data, *TASK, "--fixed-dictionary", fixed, *TEACHER, *TRAIN_FLAGS,
            "--max-update", "300", "--save-dir", teacher, "--disable-validation")
    return data, fixed, teacher / "checkpoint_last.pt"


def generate(data, fixed, path, pair, *extra):
    src, tgt = pair.split("-")
    proc = run_cli("fairseq-generate", data, *TASK, "--fixed-dictionary", fixed, "-s", src, "-t", tgt,
                   "--path", path, "--beam", "3", "--batch-size", "16", "--gen-subset", "test",
                   "--required-batch-size-multiple", "1", "--max-len-b", "10", *extra)
    hyps = hypotheses(proc.stdout)
    assert len(hyps) == 30
    return hyps


def test_phase1_for_every_direction_materialises_into_a_stock_multilingual_student(multilingual, tmp_path):
    """Phase 1 on both directions (with word-level KD), the materialised student decoded by
    stock fairseq and, exported, by CTranslate2 with the target language token as prefix."""
    data, fixed, teacher = multilingual
    flags = [a for a in TRAIN_FLAGS if a not in ("label_smoothed_cross_entropy",)]
    flags[flags.index("--criterion") + 1:flags.index("--criterion") + 1] = ["kd_label_smoothed_cross_entropy"]
    run_cli("fairseq-train", data, *TASK, "--fixed-dictionary", fixed, "--user-dir", USER_DIR,
            "--arch", "wd_transformer", "--teacher-path", teacher, *STUDENT, *flags,
            "--kd-alpha", "0.5", "--max-update", "10", "--save-dir", tmp_path / "phase1")
    proc = run_cli("wd-materialize", tmp_path / "phase1" / "checkpoint_last.pt", tmp_path / "student.pt")
    # the printed phase-2 command carries the task's flags
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("phase 2"))
    assert "--task translation_multi_simple_epoch --lang-pairs es-en,en-es" in hint
    assert "--encoder-langtok src --decoder-langtok" in hint
    for pair in PAIRS:
        phase1 = generate(data, fixed, tmp_path / "phase1" / "checkpoint_last.pt", pair, "--user-dir", USER_DIR)
        assert generate(data, fixed, tmp_path / "student.pt", pair) == phase1
    proc = run_cli("wd-export-ct2", tmp_path / "student.pt", tmp_path / "ct2", "--quantization", "float32")
    # its usage line shows the language tokens
    assert "usage (es-en; " in proc.stdout
    assert "translate_batch([['__es__', *source tokens]], target_prefix=[['__en__']], " in proc.stdout
    import ctranslate2
    from fairseq.data import Dictionary, data_utils

    translator = ctranslate2.Translator(str(tmp_path / "ct2"))
    dictionary = Dictionary.load(str(fixed))
    for pair in PAIRS:
        src, tgt = pair.split("-")
        source = data_utils.load_indexed_dataset(str(data / f"test.{pair}.{src}"), dictionary)
        sentences = [[f"__{src}__"] + dictionary.string(source[i]).split() for i in range(len(source))]
        results = translator.translate_batch(sentences, target_prefix=[[f"__{tgt}__"]] * len(sentences),
                                             beam_size=1, max_decoding_length=10)
        ct2 = sorted(" ".join(r.hypotheses[0][1:]) for r in results)  # (the prefix stripped; both
        # engines stop at 10 tokens, prefix included)
        assert ct2 == generate(data, fixed, tmp_path / "student.pt", pair, "--beam", "1", "--max-len-a", "0",
                               "--max-len-b", "10")


def test_selected_student_of_a_multilingual_teacher_decodes_with_stock_fairseq(multilingual, tmp_path):
    data, fixed, teacher = multilingual
    # (the teacher shares all its tables: the selected student keeps one width)
    proc = run_cli("wd-init-student", teacher, tmp_path / "selected.pt", "--decoder-layers", "1")
    assert "--task translation_multi_simple_epoch" in proc.stdout
    generate(data, fixed, tmp_path / "selected.pt", "es-en")
    # wd-evaluate scores a multilingual fairseq-generate log (the language token is not output)
    proc = run_cli("fairseq-generate", data, *TASK, "--fixed-dictionary", fixed, "-s", "es", "-t", "en",
                   "--path", tmp_path / "selected.pt", "--beam", "2", "--batch-size", "16", "--gen-subset",
                   "test", "--required-batch-size-multiple", "1", "--max-len-b", "10", "--remove-bpe")
    # (as a user saves it: `> gen.txt 2>&1`; the 'Translated ...' line is logged to stderr)
    (tmp_path / "gen.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    run_cli("wd-evaluate", "score", "--generate-log", tmp_path / "gen.txt", "--refs", data.parent / "raw" / "test.en",
            "--lang", "en", "--name", "selected", "--hypotheses-out", tmp_path / "hyp.txt", "--out", tmp_path / "s.json")
    hyps = (tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 30 and not any("__" in h for h in hyps)
    assert 0 <= json.loads((tmp_path / "s.json").read_text())["sacrebleu"] <= 100


def kd_data(data, teacher, directory, pair, *flags):
    """wd-kd-data for one direction of a copy of ``data``; (summary, train1 target lines)."""
    shutil.copytree(data, directory)
    src, tgt = pair.split("-")
    run_cli("wd-kd-data", directory, "--teacher-path", teacher, "-s", src, "-t", tgt, "--beam", "1",
            "--max-len-a", "1.2", "--max-len-b", "10", *flags)
    work = directory / f"kd-train1.{pair}"
    summary = json.loads((work / "summary.json").read_text())
    return summary, (work / f"train1.{tgt}").read_text(encoding="utf-8").splitlines()


def test_kd_data_of_a_direction_agrees_across_engines_without_language_tokens(multilingual, tmp_path):
    """Both engines put the language tokens in (source prefix, forced target prefix) and
    take them out of the KD targets; CTranslate2 float32 greedy equals fairseq's."""
    data, _, teacher = multilingual
    pair = "es-en"
    fairseq, fairseq_lines = kd_data(data, teacher, tmp_path / "fairseq", pair, "--engine", "fairseq")
    ct2, ct2_lines = kd_data(data, teacher, tmp_path / "ct2", pair, "--engine", "ctranslate2",
                             "--quantization", "float32")
    src, tgt = pair.split("-")
    assert fairseq["manifest"]["lang_tokens"] == {"source": f"__{src}__", "target": f"__{tgt}__"}
    assert fairseq["counts"]["ok"] > 100  # (the rest: a tiny teacher repeating to the limit)
    assert ct2["counts"] == fairseq["counts"]
    assert ct2_lines == fairseq_lines
    assert not any("__" in line for line in fairseq_lines)
    assert (tmp_path / "fairseq" / f"train1.{pair}.{tgt}.idx").is_file()
    assert train_sizes(tmp_path / "fairseq", tmp_path / "check") == {"train": {"es-en": 600, "en-es": 600},
                                                                     "train1": {"es-en": 600, "en-es": 0}}


def train_sizes(data, save_dir):
    """{split: {direction: sentences}} that fairseq-train under the teacher's task loads
    from ``data`` (2 updates)."""
    proc = run_cli("fairseq-train", data, *TASK, "--fixed-dictionary", data / "dict.es.txt", *TEACHER,
                   *TRAIN_FLAGS, "--max-update", "2", "--save-dir", save_dir, "--disable-validation")
    sizes = {}
    for split, pair, count in re.findall(rf"{re.escape(str(data))} (train1?) (\S+) (\d+) examples",
                                         proc.stdout + proc.stderr):
        sizes.setdefault(split, {})[pair] = int(count)
    return sizes


def test_kd_data_of_one_direction_does_not_train_the_reversed_one(multilingual, tmp_path):
    """fairseq reads a split of en-es backwards for es-en where es-en has none: wd-kd-data
    leaves an empty train1 there, which the KD data of es-en later replaces."""
    data, _, teacher = multilingual
    kd_data(data, teacher, tmp_path / "kd", "en-es", "--engine", "fairseq")
    assert train_sizes(tmp_path / "kd", tmp_path / "one")["train1"] == {"en-es": 600, "es-en": 0}
    summary = run_cli("wd-kd-data", tmp_path / "kd", "--teacher-path", teacher, "-s", "es", "-t", "en",
                      "--beam", "1", "--max-len-a", "1.2", "--max-len-b", "10", "--engine", "fairseq")
    assert "up to date" not in summary.stdout
    assert train_sizes(tmp_path / "kd", tmp_path / "both")["train1"] == {"en-es": 600, "es-en": 600}


@pytest.fixture(scope="module")
def few(multilingual, tmp_path_factory):
    """A data-bin of the es-en direction with only 40 training pairs (the teacher's
    dictionary): the tokens a narrow student needs are a fraction of the teacher's."""
    data, fixed, _ = multilingual
    base = tmp_path_factory.mktemp("few")
    bpe = data.parent
    for split, n in (("train", 40), ("valid", 10), ("test", 10)):
        for lang in ("es", "en"):
            lines = (bpe / f"bpe.{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (base / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = base / "data-bin"
    run_cli("fairseq-preprocess", "-s", "es", "-t", "en", "--trainpref", base / "train", "--validpref",
            base / "valid", "--testpref", base / "test", "--srcdict", fixed, "--tgtdict", fixed,
            "--destdir", out, "--workers", "1")
    return out


def test_trimmed_teacher_keeps_the_used_tokens_and_their_scores(multilingual, few, tmp_path):
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary, data_utils

    import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoint types)
    from wd_fairseq.multilingual import direction_task

    _, _, teacher = multilingual
    # (OUT given relative to the working directory)
    proc = run_cli("wd-trim-vocab", teacher, few, "trimmed", "--pairs", "es-en", cwd=tmp_path)
    summary = json.loads((tmp_path / "trimmed" / "trim.json").read_text())
    old_size, new_size = summary["target_vocabulary"]
    assert new_size < old_size and "vocabulary" in proc.stdout  # (a tiny BPE: mostly characters)
    old_dict, new_dict = (Dictionary.load(str(d / "dict.en.txt")) for d in (few, tmp_path / "trimmed"))
    # the renumbered data reads as the same text
    for lang in ("es", "en"):
        old = data_utils.load_indexed_dataset(str(few / f"train.es-en.{lang}"), old_dict)
        new = data_utils.load_indexed_dataset(str(tmp_path / "trimmed" / f"train.es-en.{lang}"), new_dict)
        assert [old_dict.string(old[i]) for i in range(len(old))] == [new_dict.string(new[i]) for i in range(len(new))]
    # the trimmed teacher's logits are the teacher's, for the kept tokens and language tokens
    models = {}
    for name, path, data in (("old", teacher, few), ("new", tmp_path / "trimmed" / "teacher.pt", tmp_path / "trimmed")):
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        task = direction_task(state["cfg"].task, str(data), "es", "en", name)
        [models[name]], _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
        models[name].eval()
        models[name + "_dict"] = task.target_dictionary
    old_task_dict, new_task_dict = models["old_dict"], models["new_dict"]
    kept = torch.tensor([old_task_dict.index(s) for s in new_task_dict.symbols])
    assert {"__es__", "__en__"} <= set(new_task_dict.symbols) and len(new_task_dict) == new_size
    src_new = torch.tensor([[new_task_dict.index("__es__"), 10, 11, 12, new_task_dict.eos()]])
    prev_new = torch.tensor([[new_task_dict.eos(), new_task_dict.index("__en__"), 13, 14]])
    with torch.no_grad():
        out_new = models["new"](src_new, torch.tensor([5]), prev_new)[0]
        out_old = models["old"](kept[src_new], torch.tensor([5]), kept[prev_new])[0]
    torch.testing.assert_close(out_new, out_old[..., kept])
    # the printed phase-1 command is complete: the kept languages in the teacher's order, the
    # new dictionary; it runs from any working directory
    trimmed = tmp_path / "trimmed"
    line = next(line for line in proc.stdout.splitlines() if line.startswith("next"))
    command = shlex.split(line[line.index("fairseq-train"):].replace("<student shape and training flags>", ""))
    assert command[:2] == ["fairseq-train", str(trimmed)]
    task = command[command.index("--task"):command.index("--teacher-path")]
    assert task == ["--task", "translation_multi_simple_epoch", "--lang-pairs", "es-en", "--encoder-langtok",
                    "src", "--decoder-langtok", "--langs", "es,en", "--lang-tok-style", "multilingual",
                    "--fixed-dictionary", str(trimmed / "dict.es.txt")]
    assert command[command.index("--teacher-path") + 1] == str(trimmed / "teacher.pt")
    stored = checkpoint_utils.load_checkpoint_to_cpu(str(trimmed / "teacher.pt"))["cfg"]["task"]
    assert (stored.data, stored.fixed_dictionary) == (str(trimmed), str(trimmed / "dict.es.txt"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a one-direction student of the trimmed teacher has the small vocabulary, and decodes
    # with stock fairseq under the trimmed run's task flags
    # (with the bounded embedding generators: one scale and shift for every token)
    run_cli(*command, *STUDENT, *TRAIN_FLAGS, "--max-update", "4", "--save-dir", tmp_path / "phase1",
            "--disable-validation", "--wd-table-scale", "shared", cwd=elsewhere)
    phase1 = torch.load(tmp_path / "phase1" / "checkpoint_last.pt", weights_only=False)["model"]
    scales = [k for k in phase1 if "embed_tokens" in k and k.endswith("generator.scale")]
    assert scales and all(phase1[k].shape[0] == 1 for k in scales)
    run_cli("wd-materialize", tmp_path / "phase1" / "checkpoint_last.pt", tmp_path / "student.pt")
    student = torch.load(tmp_path / "student.pt", weights_only=True)
    assert student["model"]["decoder.output_projection.weight"].shape[0] == new_size
    proc = run_cli("fairseq-generate", trimmed, *task, "-s", "es", "-t", "en", "--path", tmp_path / "student.pt",
                   "--beam", "2", "--batch-size", "8", "--gen-subset", "test", "--max-len-b", "5",
                   "--required-batch-size-multiple", "1")
    assert len(hypotheses(proc.stdout)) == 10


@pytest.mark.parametrize("langs,expected", [
    ("es,en,fr", ["3 language tokens of --langs/--lang-pairs), -1.", "Pass the teacher's own language list"]),
    # as many language tokens, in another order: each language would read the other's
    ("en,es", ["its language tokens are those of --langs es,en, in that order; the multilingual "
               "task's are of en,es, so a language would read another's token. Fix: pass --langs es,en"]),
], ids=["more-languages", "other-order"])
def test_a_teacher_trained_with_other_languages_is_refused_with_what_to_pass(multilingual, langs, expected,
                                                                            tmp_path):
    data, fixed, teacher = multilingual
    task = [a if a != "es,en" else langs for a in TASK]
    proc = run_cli("fairseq-train", data, *task, "--fixed-dictionary", fixed, "--user-dir", USER_DIR,
                   "--arch", "wd_transformer", "--teacher-path", teacher, *STUDENT, *TRAIN_FLAGS,
                   "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]


def nllb_style(teacher, path):
    """The teacher as fairseq's nllb branch would have saved it with
    --add-data-source-prefix-tags: 3 more rows after the language tokens."""
    import argparse


    state = torch.load(teacher, weights_only=False)
    task = vars(state["cfg"]["task"]) if isinstance(state["cfg"]["task"], argparse.Namespace) \
        else dict(state["cfg"]["task"])
    state["cfg"]["task"] = argparse.Namespace(**task, add_data_source_prefix_tags=True)
    for name, table in list(state["model"].items()):
        if name.endswith(("embed_tokens.weight", "output_projection.weight")):
            state["model"][name] = torch.cat([table, torch.randn(3, table.shape[1])])
    torch.save(state, path)
    return path


def test_nllb_data_source_tags_are_handled_by_the_tools_and_refused_by_fairseq_main(multilingual, tmp_path):
    data, fixed, teacher = multilingual
    nllb = nllb_style(teacher, tmp_path / "nllb.pt")
    # fairseq main's task lacks the 3 entries: phase 1 says what to do
    proc = run_cli("fairseq-train", data, *TASK, "--fixed-dictionary", fixed, "--user-dir", USER_DIR,
                   "--arch", "wd_transformer", "--teacher-path", nllb, *STUDENT, *TRAIN_FLAGS,
                   "--max-update", "1", "--save-dir", tmp_path / "refused", check=False)
    assert proc.returncode != 0 and "+3." in proc.stderr and "wd-trim-vocab" in proc.stderr
    # wd-kd-data adds them itself
    summary, lines = kd_data(data, nllb, tmp_path / "kd", "es-en", "--engine", "fairseq")
    assert summary["sentences"] == 600 and len(lines) == 600
    # wd-trim-vocab drops them (the data never uses them): its teacher trains in fairseq main
    run_cli("wd-trim-vocab", nllb, data, tmp_path / "trimmed", "--pairs", "es-en,en-es")
    trimmed = tmp_path / "trimmed"
    # (the teacher's --langs order: wd-trim-vocab keeps it)
    run_cli("fairseq-train", trimmed, *TASK, "--fixed-dictionary", trimmed / "dict.es.txt", "--user-dir", USER_DIR,
            "--arch", "wd_transformer", "--teacher-path", trimmed / "teacher.pt", *STUDENT, *TRAIN_FLAGS,
            "--max-update", "1", "--save-dir", tmp_path / "phase1", "--disable-validation")


M2M_LIKE = dict(arch="transformer", _name="transformer", encoder_layers=12, decoder_layers=12,
                encoder_embed_dim=64, decoder_embed_dim=64, encoder_ffn_embed_dim=256,
                decoder_ffn_embed_dim=256, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_normalize_before=True, decoder_normalize_before=True, share_all_embeddings=True,
                share_decoder_input_output_embed=True, dropout=0.1)


@pytest.mark.parametrize("table_scale", ["token", "shared"])
def test_phase1_of_an_m2m_100_shaped_teacher(tmp_path, table_scale, one_thread):
    """M2M-100 418M's depth, pre-norm, shared tables and 128,112-entry dictionary (width
    scaled down to 64, random weights): phase 1 builds, its table generator is
    vocabulary x width per token or one row shared, and a batch goes through."""
    from fairseq import options, tasks
    from fairseq.data import Dictionary, indexed_dataset
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    vocabulary = 128_112
    dictionary = Dictionary()
    for i in range(vocabulary - len(dictionary)):
        dictionary.add_symbol(f"t{i}")
    for lang in ("src", "tgt"):
        dictionary.save(str(tmp_path / f"dict.{lang}.txt"))
        builder = indexed_dataset.make_builder(str(tmp_path / f"train.src-tgt.{lang}.bin"), impl="mmap",
                                               vocab_size=vocabulary)
        for i in range(4):
            builder.add_item(torch.tensor([100 + i, 127_000 + i, 5_000, dictionary.eos()]))
        builder.finalize(str(tmp_path / f"train.src-tgt.{lang}.idx"))
    argv = [str(tmp_path), "--user-dir", USER_DIR, "--arch", "wd_transformer", "--teacher-config",
            json.dumps(M2M_LIKE), "--wd-table-scale", table_scale, "--encoder-layers", "6",
            "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
            "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--share-all-embeddings",
            "--cpu"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    from fairseq import utils
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    assert model.teacher.encoder.embed_tokens.weight.shape == (vocabulary, 64)
    assert len(model.teacher.encoder.layers) == 12 and model.teacher.cfg.encoder.normalize_before
    table = next(g for m, _, g in model.generated_tensors() if m is model.encoder.embed_tokens).bank.generator
    assert table.scale.shape == ((vocabulary, 32) if table_scale == "token" else (1, 32))
    sample = task.dataset("train").collater([task.dataset("train")[i] for i in range(4)])
    logits = model(**sample["net_input"])[0]
    assert logits.shape[-1] == vocabulary and torch.isfinite(logits).all()


def test_wd_distill_distils_a_direction_of_the_multilingual_teacher(multilingual, tmp_path):
    """wd-distill --lang-pairs es-en --trim: KD data for that direction only, then teacher and
    data trimmed to its tokens; training runs under the trimmed task's flags (those
    wd-trim-vocab reports), the student is scored and exported with the small vocabulary."""
    data, _, teacher = multilingual
    # few updates, so few saves: each save of fairseq's multilingual task waits 5 s for the data
    # worker of the validation iterator it left to the garbage collector
    common = ["--teacher-path", teacher, "--data", data, "--updates", "4", "--phase1-updates", "2",
              *STUDENT, "--cpu", "--max-tokens", "2000", "--max-len-a", "0", "--max-len-b", "12"]
    proc = run_cli("wd-distill", "plan", *common, "--work", tmp_path / "w", "--lang-pairs", "fr-en", check=False)
    assert proc.returncode == 1 and "fr-en not among the teacher's directions (es-en,en-es)" in proc.stderr
    work = tmp_path / "distill"
    run_cli("wd-distill", "run", *common, "--work", work, "--lang-pairs", "es-en", "--trim")
    card = json.loads((work / "results.json").read_text())
    assert card["directions"] == ["es-en"] and set(card["scores"]["es-en"]) == {"teacher", "student"}
    assert (work / "data-bin-kd" / "train1.es-en.en.bin").is_file()
    assert not (work / "data-bin-kd" / "kd-train1.en-es").exists()  # en-es: not decoded
    trim = json.loads((work / "trimmed" / "trim.json").read_text())
    task = trim["phase1_flags"][1:trim["phase1_flags"].index("--teacher-path")]
    assert task[:3] == ["--task", "translation_multi_simple_epoch", "--lang-pairs"]
    for stage in ("wd_phase1", "wd_phase2"):
        command = (work / "logs" / f"{stage}.log").read_text().splitlines()[0]
        assert " ".join(task) in command and f"{work}/trimmed " in command, stage
    assert trim["target_vocabulary"][1] < trim["target_vocabulary"][0]
    student = torch.load(work / "export" / "student.pt", weights_only=True)["model"]
    assert student["decoder.embed_tokens.weight"].shape[0] < torch.load(
        teacher, weights_only=True)["model"]["decoder.embed_tokens.weight"].shape[0]
    assert (work / "export" / "ct2-int8" / "model.bin").is_file()
