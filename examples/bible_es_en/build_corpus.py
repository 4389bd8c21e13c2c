#!/usr/bin/env python3
"""Build the Spanish-English Bible corpus shipped in ``corpus/``.

Sources (both public domain, packaged by Debian):
  * Spanish: Reina-Valera 1909, SWORD module ``spaRV1909eb``
    (Debian package ``sword-text-sparv``);
  * English: World English Bible, SWORD module ``engWEB2015eb``
    (Debian package ``sword-text-web``).

Both are read with the SWORD command-line front end ``diatheke`` (Debian
package ``diatheke``), one book per call, in its OSIS output format:
one line per verse, ``[heading]  Book C:V: text``.  We use OSIS rather than
``plain`` because the plain renderer drops the spaces between some adjacent
``<w>`` word elements ("Godcreated", "allítambiénbdelio"); with OSIS we can
see those word boundaries and restore the spaces.

Pipeline
  1. fetch: run diatheke, parse each line into {(book, chapter, verse): text}.
     Headings are kept only where a new one starts (diatheke repeats the last
     heading before every following verse); in Psalms they are the canonical
     titles, which the Spanish text carries inside verse 1, so they are
     prepended to the English verse.  Psalms is fetched chapter by chapter,
     so that two consecutive psalms with the same title both get it.
  2. clean: strip markup, restore lost spaces, normalise whitespace, undo
     the all-caps first word of Spanish chapters, drop the Spanish
     subscriptions appended to the last verse of the epistles and the
     glossary appended to the last verse of the English.
  3. align: keep only references that are non-empty in both languages, and
     drop every chapter where the two modules number verses differently
     (detected by trailing verses that are empty in just one language)
     together with the chapter after it, which the shifted text spills into;
     then drop single verses that still look misaligned (length ratio, or a
     neighbouring verse that matches better; see misaligned()).
  4. dedupe + split: drop exact duplicate pairs; group pairs that share a
     source or a target sentence (after light normalisation) so that a group
     never straddles two splits; order groups by a seeded hash and fill
     valid, then test, then train.
  5. write ``corpus/{train,valid,test}.{es,en}.xz`` (deterministic bytes),
     ``corpus/README.md``, and check the result.

Usage:  python examples/bible_es_en/build_corpus.py [--out DIR] [--check]
        (--check only re-verifies already written files)
Needs:  apt-get install diatheke sword-text-sparv sword-text-web
"""

import argparse
import collections
import hashlib
import itertools
import lzma
import os
import re
import shutil
import subprocess
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = {"es": "spaRV1909eb", "en": "engWEB2015eb"}
PACKAGES = {"es": "sword-text-sparv", "en": "sword-text-web"}
SPLITS = ("train", "valid", "test")
HELDOUT_SIZE = 1000           # pairs in valid and in test (approximately)
MAX_HELDOUT_GROUP = 4         # bigger groups (formulaic verses) go to train
SEED = "bible-es-en-v1"
MIN_RATIO, MAX_RATIO = 0.5, 2.0   # allowed es/en length ratio (chars)
MARGIN = 0.1                      # see misaligned()
FILL_GAP = 4                      # see misaligned()
XZ_PRESET = 9 | lzma.PRESET_EXTREME

# The 66 books both modules share; the English module also has the
# deuterocanon, which the Spanish one lacks, so those books are never fetched.
BOOKS = """Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|
I Samuel|II Samuel|I Kings|II Kings|I Chronicles|II Chronicles|Ezra|Nehemiah|
Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|Isaiah|Jeremiah|
Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|
Habakkuk|Zephaniah|Haggai|Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|
Romans|I Corinthians|II Corinthians|Galatians|Ephesians|Philippians|
Colossians|I Thessalonians|II Thessalonians|I Timothy|II Timothy|Titus|
Philemon|Hebrews|James|I Peter|II Peter|I John|II John|III John|Jude|
Revelation of John""".replace("\n", "").split("|")
# (diatheke's English names: it accepts them as keys and prints them back)
PAULINE = set(BOOKS[BOOKS.index("Romans"):BOOKS.index("Hebrews") + 1])

# Spanish object pronouns written joined to the verb ("díjole", "sácalo").
CLITICS = set("lo la los las le les me te se nos os".split())
LETTER = r"[^\W\d_]"
GLUE = "\x00"                 # marks a place where a tag touched a letter


# --------------------------------------------------------------------- fetch

def diatheke(module, key):
    """Return diatheke's OSIS rendering of `key` from `module`."""
    cmd = ["diatheke", "-b", module, "-f", "OSIS", "-l", "en", "-k", key]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True).stdout
    except FileNotFoundError:
        sys.exit("error: `diatheke` not found; install the Debian package: "
                 "apt-get install diatheke sword-text-sparv sword-text-web")
    return out.decode("utf-8")


def check_modules():
    listing = diatheke("system", "modulelist")
    for lang, module in MODULES.items():
        if module not in listing:
            sys.exit(f"error: SWORD module {module} not installed; install "
                     f"the Debian package: apt-get install {PACKAGES[lang]}")


def parse(output, book):
    """Yield (chapter, verse, heading, raw_text) for each verse line."""
    ref = re.compile(rf"(?:^|\s){re.escape(book)} (\d+):(\d+): ?")
    for line in output.splitlines():
        m = ref.search(line)
        if m:
            heading, text = line[:m.start()].strip(), line[m.end():]
            yield int(m[1]), int(m[2]), heading, text


def fetch_book(module, book):
    """{(book, chapter, verse): raw OSIS text} for one book of one module."""
    whole = diatheke(module, book)
    chapters = sorted({c for c, *_ in parse(whole, book)})
    if not chapters:
        sys.exit(f"error: diatheke returned no verses for {book} in {module}")
    if book == "Psalms":  # one call per psalm, see the module docstring
        outputs = [diatheke(module, f"{book} {c}") for c in chapters]
    else:
        outputs = [whole]
    verses = {}
    for output in outputs:
        previous = ""
        for c, v, heading, text in parse(output, book):
            if heading and heading != previous:
                text = heading + " " + text
            previous = heading
            verses[(book, c, v)] = text
    return verses


def fetch(lang):
    verses = {}
    for book in BOOKS:
        verses.update(fetch_book(MODULES[lang], book))
    return verses


# --------------------------------------------------------------------- clean

def clean_markup(text):
    """Remove OSIS tags; keep a GLUE mark where a tag sat between letters."""
    text = re.sub(r"<title\b[^>]*>.*?</title>", " ", text)
    text = re.sub(r"<note\b[^>]*>.*?</note>", " ", text)   # footnotes
    text = re.sub(r"<[^>]*>", GLUE, text)
    text = re.sub(rf"(?<={LETTER}){GLUE}+(?={LETTER})", "\x01", text)
    text = text.replace(GLUE, "").replace("\x01", GLUE)
    return " ".join(text.split())


def vocabulary(texts):
    """Word counts over the texts, ignoring words that contain a GLUE mark."""
    counts = collections.Counter()
    for text in texts:
        for word in text.split():
            if GLUE not in word:
                counts.update(w.lower() for w in re.findall(rf"{LETTER}+",
                                                            word))
    return counts


def unglue(text, lang, vocab):
    """Decide at every GLUE mark whether the two sides are separate words.

    The renderer lost a space at these places, except for Spanish enclitic
    pronouns, which are written joined ("Júramelo"): keep those joined when
    the joined word occurs elsewhere or the verb part alone never does."""
    parts = text.split(GLUE)
    out = parts[0]
    for right in parts[1:]:
        left = re.search(rf"{LETTER}+$", out)[0]
        start = re.match(rf"{LETTER}+", right)[0]
        joined = (left + start).lower()
        if not (lang == "es" and start.lower() in CLITICS
                and (vocab[joined] or not vocab[left.lower()])):
            out += " "
        out += right
    return out


def fix_text(text):
    """Whitespace and punctuation repairs common to both languages."""
    text = unicodedata.normalize("NFC", text)
    # a missing space after sentence punctuation: "world.The", "cubits,and"
    text = re.sub(rf"(?<=[a-záéíóúñü][.,;:!?])(?={LETTER})", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)   # "word ," -> "word,"
    return " ".join(text.split())


def recase_opening(text, cased):
    """RV1909 prints the first word of a chapter in capitals ("EN el
    principio", "Y DESPUÉS movió"): give it its usual casing.  The word is
    the first all-capital one followed by a word that is not (this skips
    the Hebrew letter in "ALEPH. BIENAVENTURADOS los ...")."""
    words = list(re.finditer(rf"{LETTER}+", text[:100]))
    for m, after in zip(words, words[1:]):
        word = m[0]
        if len(word) > 1 and word.isupper() and not after[0].isupper():
            break
    else:
        return text
    if re.search(LETTER, text[:m.start()].split(".")[-1]):
        # inside a sentence: the casing the word usually has elsewhere
        forms = cased.get(word.lower())
        new = forms.most_common(1)[0][0] if forms else word.lower()
    else:
        new = word[0] + word[1:].lower()
    return text[:m.start()] + new + text[m.end():]


# The WEB module appends its glossary to the last verse of Revelation.
APPENDIX = re.compile(r"\s*The following words used in the World English "
                      r"Bible\b.*$")
SUBSCRIPTION = re.compile(r"(Amén\.)\s+[^.]*\b(escrita|enviada)\b.*$",
                          re.IGNORECASE)


def clean_all(raw, lang):
    texts = {ref: clean_markup(t) for ref, t in raw.items()}
    vocab = vocabulary(texts.values())
    out = {ref: fix_text(unglue(t, lang, vocab)) for ref, t in texts.items()}
    if lang == "en":
        out = {ref: APPENDIX.sub("", t) for ref, t in out.items()}
    if lang == "es":
        cased = collections.defaultdict(collections.Counter)
        for text in out.values():
            for w in re.findall(rf"{LETTER}+", text):
                if not w.isupper():
                    cased[w.lower()][w] += 1
        last = {}
        for book, c, v in out:
            last[book] = max(last.get(book, (0, 0)), (c, v))
        for (book, c, v), text in out.items():
            if v == 1:
                out[book, c, v] = recase_opening(text, cased)
            if book in PAULINE and (c, v) == last[book]:
                out[book, c, v] = SUBSCRIPTION.sub(r"\1", text)
    return out


# --------------------------------------------------------------------- align

def misnumbered_chapters(es, en):
    """Chapters whose verse numbering differs between the modules.

    Where RV1909 follows Hebrew numbering (e.g. Jonah 1:17 = Jonah 2:1) the
    module leaves the last verse(s) of the chapter empty and shifts the next
    chapter; where one text merges two verses the chapter ends with an empty
    verse.  So: a chapter ending in verses that are empty in only one of the
    texts is dropped, and so is the chapter after it."""
    by_chapter = collections.defaultdict(list)
    for ref in set(es) | set(en):
        by_chapter[ref[:2]].append(ref)
    bad = set()
    for (book, c), refs in by_chapter.items():
        for ref in sorted(refs, reverse=True):
            has_es, has_en = bool(es.get(ref)), bool(en.get(ref))
            if has_es and has_en:
                break
            if has_es != has_en:
                bad.update({(book, c), (book, c + 1)})
                break
    return bad & set(by_chapter)


def align(es, en):
    bad = misnumbered_chapters(es, en)
    order = {b: i for i, b in enumerate(BOOKS)}
    refs = sorted((r for r in es if es[r] and en.get(r) and r[:2] not in bad),
                  key=lambda r: (order[r[0]], r[1], r[2]))
    return [(r, es[r], en[r]) for r in refs], bad


def content_words(texts):
    """Per text, its lower-cased words that are neither rare nor frequent."""
    sets = [{w.lower() for w in re.findall(rf"{LETTER}+", t)} for t in texts]
    df = collections.Counter(w for s in sets for w in s)
    return [[w for w in s if 2 <= df[w] <= len(sets) / 20] for s in sets], df


def misaligned(pairs):
    """Set of refs whose two sides probably do not translate each other.

    Some verse-numbering differences leave no empty verse behind (a verse
    split differently, two verses swapped).  Two signals catch them:
      * the length ratio of the two sides is far from the usual ~1;
      * a word-association score (Dice coefficient of verse co-occurrence,
        learnt from the corpus itself) says that a neighbouring verse of
        the other language matches better than the verse's own partner.
    Flagged verses are dropped with their neighbours, and so is everything
    between two flagged verses of a chapter that are close together."""
    es, df_es = content_words(p[1] for p in pairs)
    en, df_en = content_words(p[2] for p in pairs)
    co = collections.Counter()
    for a, b in zip(es, en):
        co.update(itertools.product(a, b))

    def dice(x, y):
        c = co.get((x, y))
        return 2 * c / (df_es[x] + df_en[y]) if c else 0.0

    def score(a, b):
        if not a or not b:
            return 0.0
        return (sum(max(dice(x, y) for y in b) for x in a) / len(a) +
                sum(max(dice(x, y) for x in a) for y in b) / len(b)) / 2

    index = {p[0]: i for i, p in enumerate(pairs)}
    flagged = collections.defaultdict(list)      # chapter -> verse numbers
    for i, ((book, c, v), src, tgt) in enumerate(pairs):
        bad = not MIN_RATIO <= len(src) / len(tgt) <= MAX_RATIO
        own = score(es[i], en[i])
        for j in (index.get((book, c, v - 1)), index.get((book, c, v + 1))):
            if j is not None and max(score(es[i], en[j]),
                                     score(es[j], en[i])) > own + MARGIN:
                bad = True
        if bad:
            flagged[book, c].append(v)
    drop = set()
    for (book, c), verses in flagged.items():
        for v in verses:
            drop.update((book, c, v + d) for d in (-1, 0, 1))
        for a, b in zip(verses, verses[1:]):
            if b - a <= FILL_GAP:
                drop.update((book, c, x) for x in range(a, b))
    return drop


# --------------------------------------------------------------------- split

def sentence_key(text):
    return re.sub(r"\W+", " ", text.casefold()).strip()


def split_pairs(pairs):
    """Deterministic split; pairs sharing a source or target stay together."""
    parent = list(range(len(pairs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen = {}
    for i, (_, es, en) in enumerate(pairs):
        for key in (("es", sentence_key(es)), ("en", sentence_key(en))):
            if key in first_seen:
                parent[find(i)] = find(first_seen[key])
            else:
                first_seen[key] = i
    groups = collections.defaultdict(list)
    for i in range(len(pairs)):
        groups[find(i)].append(i)

    def rank(members):
        ref = pairs[members[0]][0]
        return hashlib.sha256(f"{SEED} {ref}".encode()).hexdigest()

    assignment = {}
    wanted = {"valid": HELDOUT_SIZE, "test": HELDOUT_SIZE}
    for members in sorted(groups.values(), key=rank):
        split = "train"
        if len(members) <= MAX_HELDOUT_GROUP:
            for name in ("valid", "test"):
                if wanted[name] >= len(members):
                    wanted[name] -= len(members)
                    split = name
                    break
        for i in members:
            assignment[i] = split
    return {s: [p for i, p in enumerate(pairs) if assignment[i] == s]
            for s in SPLITS}


# --------------------------------------------------------------------- write

def write_xz(path, lines):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ,
                           check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    with open(path + ".tmp", "wb") as f:
        f.write(packed)
    os.replace(path + ".tmp", path)


def read_xz(path):
    with lzma.open(path, "rt", encoding="utf-8", newline="\n") as f:
        return f.read().split("\n")[:-1]


def check(out_dir):
    """Verify the written corpus; exit with a message on any problem."""
    def require(ok, message):
        if not ok:
            sys.exit(f"check failed: {message}")

    seen = {"es": {}, "en": {}}
    counts = {}
    for split in SPLITS:
        es = read_xz(os.path.join(out_dir, f"{split}.es.xz"))
        en = read_xz(os.path.join(out_dir, f"{split}.en.xz"))
        require(len(es) == len(en), f"{split}: {len(es)} es vs {len(en)} en")
        require(len(es) == len(set(zip(es, en))), f"{split}: duplicate pairs")
        for lang, lines in (("es", es), ("en", en)):
            for n, line in enumerate(lines, 1):
                where = f"{split}.{lang} line {n}"
                require(line and line.strip() == line,
                        f"{where}: empty or untrimmed")
                require(not re.search(r"[<>\x00-\x1f]", line),
                        f"{where}: markup left: {line!r}")
                other = seen[lang].setdefault(sentence_key(line), split)
                require(other == split,
                        f"{where}: sentence also in {other}: {line!r}")
        counts[split] = len(es)
    total = sum(os.path.getsize(os.path.join(out_dir, f))
                for f in os.listdir(out_dir) if f.endswith(".xz"))
    require(total < 2 * 1024 * 1024, f"corpus too big: {total} bytes")
    return counts, total


README = """\
# Spanish-English Bible corpus

Verse-aligned parallel text, one sentence (verse) per line, xz-compressed:
`{{train,valid,test}}.{{es,en}}.xz`.  Line *n* of `X.es.xz` translates line
*n* of `X.en.xz`.

| split | pairs | es words | en words |
| --- | ---: | ---: | ---: |
{table}

Total compressed size: {size} bytes.

## Sources and licences

* Spanish: *Reina-Valera 1909*, SWORD module `spaRV1909eb` version {es_ver}
  (Debian package `sword-text-sparv`).  Public domain.
* English: *World English Bible*, SWORD module `engWEB2015eb` version {en_ver}
  (Debian package `sword-text-web`).  Public domain.  "World English Bible"
  is a trademark of eBible.org, which asks that modified text not be called
  by that name: the English side here has been cleaned and realigned, so it
  is a text *derived from* the World English Bible, not the WEB itself.

Both texts are in the public domain, and so is this derived corpus.

## How it was made

`../build_corpus.py` exports the 66 books both texts share with `diatheke`
(OSIS output, one call per book and per psalm), aligns them by
book/chapter/verse and cleans the text: markup and Strong's numbers removed,
spaces lost between words restored, chapter-initial capitals of the Spanish
lowered, the Spanish epistle subscriptions and the English glossary
removed, psalm titles kept on both sides.  It then drops verses empty in
either text, the {dropped} chapters whose verse numbering differs between
the two editions, and {suspect} verses that look misaligned (odd length
ratio, or a neighbouring verse matches better), removes duplicate pairs,
and splits by verse with a seeded hash: identical sentences (on either
side) always fall in the same split.  Regenerate (byte-identical, given the
same Debian packages) with:

    apt-get install diatheke sword-text-sparv sword-text-web
    python examples/bible_es_en/build_corpus.py

and extract to plain text with `python examples/bible_es_en/corpus.py DIR`.
"""


def module_version(module):
    """The module's Version= from its SWORD .conf file, if it can be read."""
    confs = "/usr/share/sword/mods.d"
    try:
        for name in sorted(os.listdir(confs)):
            if name.lower() == module.lower() + ".conf":
                with open(os.path.join(confs, name), encoding="utf-8") as f:
                    return re.search(r"^Version=(.*)$", f.read(), re.M)[1]
    except (OSError, TypeError):
        pass
    return "unknown"


def write_corpus(out_dir, splits, dropped, suspect):
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rows = []
    for split in SPLITS:
        pairs = splits[split]
        for i, lang in ((1, "es"), (2, "en")):
            write_xz(os.path.join(tmp, f"{split}.{lang}.xz"),
                     [p[i] for p in pairs])
        words = [sum(len(p[i].split()) for p in pairs) for i in (1, 2)]
        rows.append(f"| {split} | {len(pairs)} | {words[0]} | {words[1]} |")
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(README.format(table="\n".join(rows), size=size,
                              dropped=len(dropped), suspect=suspect,
                              es_ver=module_version(MODULES["es"]),
                              en_ver=module_version(MODULES["en"])))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "corpus"))
    ap.add_argument("--check", action="store_true",
                    help="only verify an existing corpus")
    args = ap.parse_args()
    if not args.check:
        check_modules()
        es, en = clean_all(fetch("es"), "es"), clean_all(fetch("en"), "en")
        pairs, dropped = align(es, en)
        suspect = misaligned(pairs) & {p[0] for p in pairs}
        unique, seen = [], set()
        for pair in pairs:
            if pair[0] in suspect:
                continue
            if pair[1:] not in seen:
                seen.add(pair[1:])
                unique.append(pair)
        print(f"{len(es)} es / {len(en)} en verses, {len(pairs)} aligned, "
              f"{len(suspect)} look misaligned, "
              f"{len(unique)} kept; dropped chapters: "
              f"{', '.join(f'{b} {c}' for b, c in sorted(dropped))}")
        write_corpus(args.out, split_pairs(unique), dropped, len(suspect))
    counts, total = check(args.out)
    print(f"ok: {counts}, {total} bytes compressed")


if __name__ == "__main__":
    main()
