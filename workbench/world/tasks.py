"""Scenes, questions and batchers of the miniature world.

An :class:`Example` is a prompt (with placeholders), an answer string and the raw inputs in
placeholder order. Question families:

- text only (the base LLM's pretraining and the 'replay' mix): ``copy`` (what is in the input,
  over word lists) and ``common`` (which word all lists share, four options, hard distractors);
  and the instruct stage's text versions of the experts' own tasks (:func:`text_own_question`);
- per modality (:data:`QUESTION_TYPES`; each expert trains on its modality's :data:`OWN_TASKS`):
  ``caption`` (projector stage), ``present``, ``absent`` ("which of these is not in the input"),
  ``count``, ``first``/``last`` (audio, video only) and ``common_text`` (the modality input plus a
  word list: which thing do they share);
- multi-modality ``common`` (MCUB-style; each input holds several concepts, exactly one is common
  to all, the wrong options are present in some inputs but not all);
- capability family: ``caption`` (generic, base VLM stage) and the five tasks.

Prompts are lower case (the tokenizer is word-level); option letters are upper case.

Answer style of multiple-choice questions: the prompt lists the options as ``A. cat B. drum ...``
and the model answers with the option's *text* (``cat``); the gold letter is kept in
``Example.letter`` (and is the gpt turn of MCUB records). A from-scratch 0.9M-parameter LM did not
learn to emit the option *letter* (symbol binding) within the CPU budget (600 steps: chance), while
copying the chosen word is learned fast; the evaluation maps the answer text back to its letter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .concepts import (CAP_COLORS, CAP_COLS, CAP_ROWS, CAP_SIDES, CAP_TASKS, CAP_VALUES, CONCEPTS,
                       CONTENT_WORDS, COUNT_WORDS, LETTERS, MODALITIES, N_CONCEPTS, N_SLOTS, PLACEHOLDERS)
from .generators import render, render_capability

COMMON_Q = "which thing do all inputs have in common?"
#: The question types each modality's input can be asked (``first`` / ``last`` need an order: audio
#: and video). The modality family's instruct LLM learns all of them in words
#: (:func:`text_own_question`), as a text instruct LLM knows its formats before any encoder is attached.
QUESTION_TYPES: dict[str, tuple[str, ...]] = {
    "image": ("present", "absent", "count", "common_text"),
    "point": ("present", "absent", "count", "common_text"),
    "audio": ("present", "absent", "count", "first", "last", "common_text"),
    "video": ("present", "absent", "count", "first", "last", "common_text"),
}
#: The experts' own tasks (their training data and own-task evaluation sets, issue #19): what MCUB
#: composes - naming what is in the input (``present``) and sharing a concept with text
#: (``common_text``) - in every expert's data, plus a question type of the modality's own where the
#: input has one (audio ``first``, video ``last``; image and point clouds, unordered, ``count``).
#: Before, every modality trained on every type of :data:`QUESTION_TYPES`; the experts' first steps
#: followed the question type, not the modality (one type in two modalities: gradient cosine 0.61;
#: two types: 0.03-0.05), their task vectors had mean pairwise cosine 0.26 / 0.25 / 0.25 / 0.30 in
#: layers 0-3, and ``absent`` - whose gradients agreed most across modalities (0.87-0.94) - stayed at
#: chance for every expert (16-29%, four options). Seed-0 trial of these own tasks with the zoo's
#: recipe otherwise unchanged (2026-12-06): cosine 0.20 / 0.15 / 0.17 / 0.17, own-task gaps over
#: base LLM + projector 34 / 23 / 26 / 25 points, NaiveMC keeps 86-90% of each expert (log-likelihood).
OWN_TASKS: dict[str, tuple[str, ...]] = {
    "image": ("present", "count", "common_text"),
    "point": ("present", "count", "common_text"),
    "audio": ("present", "first", "common_text"),
    "video": ("present", "last", "common_text"),
}


@dataclass
class Example:
    prompt: str
    answer: str
    inputs: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (modality, raw) in prompt order
    task: str = ""
    scenes: list[tuple[int, ...]] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # the answer candidates (open answers)
    choices: list[str] = field(default_factory=list)  # multiple choice: the option texts, in A-D order
    letter: str = ""  # multiple choice: the gold letter (the answer itself is the option text)


# ----------------------------------------------------------------------------- helpers
def options_text(opts: Sequence[str]) -> str:
    return " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))


def _mc(rng: np.random.Generator, gold: str, wrong: Sequence[str]) -> tuple[list[str], str]:
    """Four options in random order: ``gold`` and three of ``wrong``; returns (options, letter)."""
    wrong = list(wrong)
    if len(wrong) < 3:
        raise ValueError(f"need 3 wrong options, got {wrong}")
    pick = [wrong[i] for i in rng.choice(len(wrong), size=3, replace=False)]
    opts = pick + [gold]
    perm = rng.permutation(4)
    opts = [opts[i] for i in perm]
    return opts, LETTERS[opts.index(gold)]


def sample_scene(rng: np.random.Generator, n_min: int = 1, n_max: int = N_SLOTS,
                 must: Sequence[int] = (), avoid: Sequence[int] = ()) -> tuple[int, ...]:
    """A scene with ``n`` distinct concepts (``n_min..n_max``) in random slots, containing ``must``."""
    n = int(rng.integers(max(n_min, len(must)), n_max + 1))
    pool = [k for k in range(N_CONCEPTS) if k not in must and k not in avoid]
    ks = list(must) + [pool[i] for i in rng.choice(len(pool), size=n - len(must), replace=False)]
    ks = [ks[i] for i in rng.permutation(len(ks))]
    slots = sorted(rng.choice(N_SLOTS, size=n, replace=False).tolist())
    scene = [-1] * N_SLOTS
    for s, k in zip(slots, ks):
        scene[s] = int(k)
    return tuple(scene)


def scene_concepts(scene: Sequence[int]) -> list[int]:
    return [int(k) for k in scene if k >= 0]


def _words(scene: Sequence[int]) -> str:
    return " ".join(CONCEPTS[k] for k in scene_concepts(scene))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


# ----------------------------------------------------------------------------- modality questions
def modality_question(modality: str, task: str, rng: np.random.Generator, render_inputs: bool = True) -> Example:
    """One own-task (or caption) question about a fresh scene of ``modality``."""
    if task == "absent":
        scene = sample_scene(rng, n_min=3)
    elif task in ("first", "last"):
        scene = sample_scene(rng, n_min=2)
    else:
        scene = sample_scene(rng)
    ks = scene_concepts(scene)
    absent = [CONCEPTS[k] for k in range(N_CONCEPTS) if k not in ks]
    present = [CONCEPTS[k] for k in ks]
    head = f"{modality}: <{modality}>\n"
    if task == "caption":
        prompt, answer, opts = head + "what is in the input?\nanswer:", _words(scene), []
    elif task == "present":
        gold = present[int(rng.integers(len(present)))]
        opts, answer = _mc(rng, gold, absent)
        prompt = head + f"which of these is in the input? {options_text(opts)}\nanswer:"
    elif task == "absent":
        gold = absent[int(rng.integers(len(absent)))]
        opts, answer = _mc(rng, gold, present)
        prompt = head + f"which of these is not in the input? {options_text(opts)}\nanswer:"
    elif task == "count":
        opts = list(COUNT_WORDS)
        answer = LETTERS[len(ks) - 1]
        prompt = head + f"how many things are in the input? {options_text(opts)}\nanswer:"
    elif task in ("first", "last"):
        gold = present[0] if task == "first" else present[-1]
        others = [w for w in present if w != gold]
        wrong = others + [absent[i] for i in rng.choice(len(absent), size=max(0, 3 - len(others)), replace=False)]
        opts, answer = _mc(rng, gold, wrong)
        prompt = head + f"which comes {task}? {options_text(opts)}\nanswer:"
    elif task == "common_text":
        # a word list sharing exactly one concept with the scene; wrong options: in one of them only
        c = ks[int(rng.integers(len(ks)))]
        other = [k for k in range(N_CONCEPTS) if k not in ks]
        n_t = int(rng.integers(2, 4))
        tw = [c] + [other[i] for i in rng.choice(len(other), size=n_t - 1, replace=False)]
        tw = [tw[i] for i in rng.permutation(len(tw))]
        wrong = [CONCEPTS[k] for k in ks if k != c] + [CONCEPTS[k] for k in tw if k != c]
        if len(wrong) < 3:
            wrong += [CONCEPTS[k] for k in other if k not in tw][: 3 - len(wrong)]
        opts, answer = _mc(rng, CONCEPTS[c], wrong)
        prompt = (head + "text: " + " ".join(CONCEPTS[k] for k in tw)
                  + f"\n{COMMON_Q} {options_text(opts)}\nanswer:")
    else:
        raise ValueError(f"unknown task {task!r} for modality {modality}")
    inputs = [(modality, render(modality, scene, _seed(rng)))] if render_inputs else []
    if not opts:
        return Example(prompt, answer, inputs, task, [scene])
    return Example(prompt, opts[LETTERS.index(answer)], inputs, task, [scene], choices=list(opts), letter=answer)


def common_scenes(k_inputs: int, rng: np.random.Generator, max_tries: int = 1000
                  ) -> tuple[list[tuple[int, ...]], int, list[int]]:
    """Scenes for a commonality question over ``k_inputs`` inputs.

    Each scene has 3-4 concepts; exactly one concept ``c`` is in all of them; the three
    distractors are concepts present in at least one but not all inputs (preferring those present
    in the most inputs). Returns (scenes, c, distractors).
    """
    for _ in range(max_tries):
        c = int(rng.integers(N_CONCEPTS))
        others = [k for k in range(N_CONCEPTS) if k != c]
        pool_size = 4 if k_inputs == 2 else 6
        pool = [others[i] for i in rng.choice(len(others), size=pool_size, replace=False)]
        sets = []
        for _i in range(k_inputs):
            n = int(rng.integers(2, 4))
            sets.append([c] + [pool[j] for j in rng.choice(len(pool), size=n, replace=False)])
        counts = {k: sum(k in s for s in sets) for k in pool}
        if any(v == k_inputs for v in counts.values()):
            continue
        cand = [k for k in pool if 0 < counts[k] < k_inputs]
        if len(cand) < 3:
            continue
        cand.sort(key=lambda k: (-counts[k], float(rng.uniform())))
        distractors = cand[:3]
        scenes = []
        for s in sets:
            slots = sorted(rng.choice(N_SLOTS, size=len(s), replace=False).tolist())
            ks = [s[i] for i in rng.permutation(len(s))]
            sc = [-1] * N_SLOTS
            for sl, k in zip(slots, ks):
                sc[sl] = int(k)
            scenes.append(tuple(sc))
        return scenes, c, distractors
    raise RuntimeError(f"could not sample a commonality question over {k_inputs} inputs")


def multimodal_common(modalities: Sequence[str], rng: np.random.Generator, render_inputs: bool = True) -> Example:
    """MCUB-style question: one input per modality (in the given order), which concept is common."""
    scenes, c, distractors = common_scenes(len(modalities), rng)
    opts, answer = _mc(rng, CONCEPTS[c], [CONCEPTS[k] for k in distractors])
    head = "".join(f"{m}: <{m}>\n" for m in modalities)
    prompt = head + f"{COMMON_Q} {options_text(opts)}\nanswer:"
    inputs = [(m, render(m, s, _seed(rng))) for m, s in zip(modalities, scenes)] if render_inputs else []
    return Example(prompt, opts[LETTERS.index(answer)], inputs, f"common{len(modalities)}", scenes,
                   choices=list(opts), letter=answer)


# ----------------------------------------------------------------------------- text-only tasks
TEXT_MIX: dict[str, float] = {"copy": 0.2, "find": 0.15, "common_easy": 0.15, "common": 0.5}


def text_question(rng: np.random.Generator, mix: dict[str, float] | None = None) -> Example:
    """Text-only pretraining / replay over word lists (labelled by modality names, as the
    multimodal prompts are). Kinds (weights ``mix``, default :data:`TEXT_MIX`):

    - ``copy``: what is in the input -> the words;
    - ``letter``: which letter is a word among four options (binds option words to letters);
    - ``find``: which of these (four options) is in the one list;
    - ``common_easy``: which word do all lists share; distractors are in no list;
    - ``common``: the same with hard distractors (in some lists but not all), as in MCUB.
    """
    mix = mix or TEXT_MIX
    kinds = list(mix)
    w = np.array([mix[k] for k in kinds], dtype=float)
    kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
    vocab = list(CONTENT_WORDS)
    if kind == "copy":
        n = int(rng.integers(1, 5))
        words = [vocab[i] for i in rng.choice(len(vocab), size=n, replace=False)]
        m = MODALITIES[int(rng.integers(4))]
        return Example(f"{m}: {' '.join(words)}\nwhat is in the input?\nanswer:", " ".join(words), [], "copy")
    if kind == "letter":
        idx = rng.choice(len(vocab), size=4, replace=False)
        opts = [vocab[i] for i in idx]
        j = int(rng.integers(4))
        return Example(f"{options_text(opts)}\nwhich letter is {opts[j]}?\nanswer:", LETTERS[j], [], "text_letter",
                       options=list(LETTERS))  # not in the default mix
    if kind == "find":
        n = int(rng.integers(1, 5))
        idx = rng.choice(len(vocab), size=n + 3, replace=False)
        words = [vocab[i] for i in idx[:n]]
        gold = words[int(rng.integers(n))]
        opts, answer = _mc(rng, gold, [vocab[i] for i in idx[n:]])
        m = MODALITIES[int(rng.integers(4))]
        return Example(f"{m}: {' '.join(words)}\nwhich of these is in the input? {options_text(opts)}\nanswer:",
                       opts[LETTERS.index(answer)], [], "text_find", choices=list(opts), letter=answer)
    k = int(rng.integers(2, 5))
    mods = [MODALITIES[i] for i in rng.choice(4, size=k, replace=False)]
    if kind == "common" and rng.uniform() < 0.5:  # over the concepts, exactly like the multimodal question
        scenes, c, distractors = common_scenes(k, rng)
        lists = [[CONCEPTS[j] for j in scene_concepts(s)] for s in scenes]
        gold, wrong = CONCEPTS[c], [CONCEPTS[j] for j in distractors]
    else:  # over any content words (keeps every word's embedding trained)
        idx = rng.choice(len(vocab), size=11, replace=False)
        c, pool, outside = vocab[idx[0]], [vocab[i] for i in idx[1:8]], [vocab[i] for i in idx[8:]]
        while True:
            lists = [[c] + [pool[j] for j in rng.choice(len(pool), size=int(rng.integers(2, 4)), replace=False)]
                     for _ in range(k)]
            cnt = {w_: sum(w_ in s_ for s_ in lists) for w_ in pool}
            cand = [w_ for w_ in pool if 0 < cnt[w_] < k]
            if len(cand) >= 3 and not any(v == k for v in cnt.values()):
                break
        for s_ in lists:
            rng.shuffle(s_)
        gold, wrong = c, (cand if kind == "common" else outside)
    opts, answer = _mc(rng, gold, wrong)
    head = "".join(f"{m}: {' '.join(s_)}\n" for m, s_ in zip(mods, lists))
    return Example(head + f"{COMMON_Q} {options_text(opts)}\nanswer:", opts[LETTERS.index(answer)], [],
                   "text_common" if kind == "common" else "text_common_easy", choices=list(opts), letter=answer)


def text_own_question(rng: np.random.Generator, task: str | None = None) -> Example:
    """A modality question (``task``, or any of a random modality's :data:`QUESTION_TYPES`) with the
    scene written as words in place of the modality input: ``image: cat drum\nwhich of these is not in
    the input? ...``. The instruct stage of the modality family's base LLM learns every answer format
    from these, as a text instruct LLM knows its question formats before any encoder is attached."""
    mods = [m for m in MODALITIES if task is None or task in QUESTION_TYPES[m]]
    if not mods:
        raise ValueError(f"no modality has the question type {task!r}")
    m = mods[int(rng.integers(len(mods)))]
    task = task or QUESTION_TYPES[m][int(rng.integers(len(QUESTION_TYPES[m])))]
    ex = modality_question(m, task, rng, render_inputs=False)
    ex.prompt = ex.prompt.replace(PLACEHOLDERS[m], _words(ex.scenes[0]))
    ex.task = f"text_{task}"
    return ex


# ----------------------------------------------------------------------------- capability family
CAP_QUESTIONS = {
    "vqa": "what color is the {shape}?",
    "geometry": "how many sides does the shape have?",
    "chart": "what is the value of the {color} bar?",
    "ocr": "what does the text say?",
    "grounding": "where is the {color} {shape}?",
}


def capability_question(task: str, rng: np.random.Generator) -> Example:
    """One capability-family example; ``task`` in CAP_TASKS or ``caption`` (generic, mixed images)."""
    img_task = CAP_TASKS[int(rng.integers(5))] if task == "caption" else task
    img, truth = render_capability(img_task, rng)
    head = "image: <image>\n"
    if task == "caption":
        if img_task in ("vqa", "grounding"):
            objs = sorted(truth["objects"], key=lambda o: (o[2], o[3]))
            ans = " ".join(f"{c} {s}" for c, s, _, _ in objs)
        elif img_task == "geometry":
            ans = "polygon"
        elif img_task == "chart":
            ans = "chart"
        else:
            ans = "text " + " ".join(truth["text"])
        return Example(head + "what is in the input?\nanswer:", ans, [("image", img)], "caption")
    if task == "vqa":
        color, shape, _, _ = truth["objects"][int(rng.integers(len(truth["objects"])))]
        q, ans, opts = CAP_QUESTIONS[task].format(shape=shape), color, list(CAP_COLORS)
    elif task == "geometry":
        q, ans, opts = CAP_QUESTIONS[task], CAP_SIDES[truth["sides"] - 3], list(CAP_SIDES)
    elif task == "chart":
        color, v = truth["bars"][int(rng.integers(4))]
        ans = CAP_VALUES[v - 1]
        wrong = [w for w in CAP_VALUES if w != ans]
        opts = [ans] + [wrong[i] for i in rng.choice(len(wrong), size=3, replace=False)]
        q = CAP_QUESTIONS[task].format(color=color)
    elif task == "ocr":
        ans = " ".join(truth["text"])
        opts = [ans]
        while len(opts) < 4:
            t = list(truth["text"])
            t[int(rng.integers(3))] = str(int(rng.integers(10)))
            cand = " ".join(t)
            if cand not in opts:
                opts.append(cand)
        q = CAP_QUESTIONS[task]
    elif task == "grounding":
        color, shape, r, c = truth["objects"][int(rng.integers(len(truth["objects"])))]
        ans = f"{CAP_ROWS[r]} {CAP_COLS[c]}"
        cells = [f"{a} {b}" for a in CAP_ROWS for b in CAP_COLS if f"{a} {b}" != ans]
        opts = [ans] + [cells[i] for i in rng.choice(len(cells), size=3, replace=False)]
        q = CAP_QUESTIONS[task].format(color=color, shape=shape)
    else:
        raise ValueError(f"unknown capability task {task!r}")
    opts = [opts[i] for i in rng.permutation(len(opts))]
    return Example(head + q + "\nanswer:", ans, [("image", img)], task, options=opts)


# ----------------------------------------------------------------------------- batchers
Sampler = Callable[[np.random.Generator], Example]


def mixture(samplers: Sequence[tuple[float, Sampler]]) -> Sampler:
    """A sampler drawing from ``samplers`` with the given weights."""
    w = np.array([s[0] for s in samplers], dtype=float)
    w = w / w.sum()

    def draw(rng: np.random.Generator) -> Example:
        return samplers[int(rng.choice(len(samplers), p=w))][1](rng)
    return draw


def own_task_sampler(modality: str, tasks: Sequence[str] | None = None) -> Sampler:
    tasks = tuple(tasks or OWN_TASKS[modality])
    return lambda rng: modality_question(modality, tasks[int(rng.integers(len(tasks)))], rng)


def batches(sampler: Sampler, batch_size: int, seed: int) -> Iterator[list[Example]]:
    """An endless, deterministic stream of batches of examples."""
    rng = np.random.default_rng(seed)
    while True:
        yield [sampler(rng) for _ in range(batch_size)]


def example_modal_inputs(ex: Example) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for m, raw in ex.inputs:
        out.setdefault(m, []).append(torch.as_tensor(raw))
    return out
