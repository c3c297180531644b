"""A long-context test suite in the style of RULER, generated offline from the packaged corpora.

Every sample is a prompt of a requested token length (haystack, inserted facts, question, and an answer prefix
that starts the model's reply, as RULER does) with its expected answers. Generation is greedy; a sample scores
the fraction of its expected answers found in the output (case-insensitive), so single-answer tasks score 0 or
1. Samples are a pure function of (task, length, index, seed).

The tasks are RULER's families, scaled so that a small instruct model solves them densely at 2-4K tokens (a task
the dense model cannot do measures nothing):

- ``niah_single``: one "special magic number" hidden in Paul Graham essays;
- ``niah_multikey``: four numbers under different keys, one asked;
- ``niah_multivalue``: two numbers under one key, both asked;
- ``niah_multiquery``: two keys asked at once;
- ``vt``: variable tracking: a number passed from one variable to another in the essays; as in RULER the answer
  prefix names the value and the answers are both variables;
- ``cwe``: the three most common words of a numbered word list;
- ``fwe``: the three most frequent words of a text of coded words;
- ``qa``: retrieval QA over the three haystacks in turn (Paul Graham essays, Shakespeare, King James Bible):
  three facts about different people are planted in the text, and one is asked.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from tsa_patch.data import load_documents

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa")
# A short fixed vocabulary for keys, variable names and coded words: tokens a small model copies reliably.
_KEYS = ("apple", "river", "candle", "mirror", "garden", "violin", "harbor", "meadow", "lantern", "compass",
         "falcon", "orchid", "pepper", "saddle", "timber", "walnut")
_PEOPLE = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal", "Keiko",
           "Lucas", "Mireille", "Nikolai", "Olga", "Pedro")
_ATTRIBUTES = ("favorite object", "lucky charm", "secret password", "childhood toy", "code word")
_WORDS = ("table", "silver", "window", "cloud", "stone", "paper", "forest", "bridge", "glass", "tiger",
          "ocean", "pencil", "rocket", "castle", "button", "ladder", "carpet", "engine", "jacket", "magnet",
          "needle", "pillow", "shadow", "wallet", "anchor", "basket", "cactus", "dragon", "feather", "helmet")


@dataclass(frozen=True)
class Sample:
    """One prompt and what a correct answer contains.

    Attributes:
        task, length, index: where it comes from (length is the requested prompt length in tokens).
        context: the user message (haystack and question).
        answer_prefix: the start of the assistant's reply, fed with the prompt.
        answers: strings the output must contain; the score is the fraction found.
        max_new_tokens: generation budget.
    """

    task: str
    length: int
    index: int
    context: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int

    def prompt(self, tokenizer) -> str:
        """The full prompt: the chat template when the tokenizer has one, then the answer prefix."""
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": self.context}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = self.context + "\n\n"
        return text + self.answer_prefix

    def score(self, output: str) -> float:
        """Fraction of the expected answers found in ``output`` (case-insensitive)."""
        return answer_score(output, self.answers)


def answer_score(output: str, answers) -> float:
    """Fraction of ``answers`` contained in ``output`` (case-insensitive): the suite's score of one generation."""
    return sum(answer.lower() in output.lower() for answer in answers) / len(answers)


class SuiteBuilder:
    """Builds samples of exact token budgets from the packaged corpora (loaded and split once)."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self._sentences: dict[str, list[str]] = {}
        self._essay_sentences = self._corpus_sentences("paul-graham")
        # Tokens of the chat template around an empty user message; answer prefixes are added per task.
        self._template = self._tokens(Sample("", 0, 0, "", "", (), 0).prompt(tokenizer)) + 8

    def sample(self, task: str, length: int, index: int) -> Sample:
        """Sample ``index`` of ``task`` whose prompt is about ``length`` tokens (within ~2 %)."""
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}'; choose from {list(TASKS)}.")
        rng = random.Random(zlib.crc32(f"{task}/{length}/{index}/{self.seed}".encode()))
        return getattr(self, f"_{task}")(rng, length, index)

    # -- token budgeting --------------------------------------------------------------------------------------

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _fit(self, pieces: list[str], length: int, fixed: str, separator: str = " ") -> list[str]:
        """The longest prefix of ``pieces`` that, joined, keeps ``fixed`` (question, answer prefix, needles) plus
        the pieces within ``length`` once the chat template is added."""
        budget = length - self._tokens(fixed) - self._template
        kept, used = [], 0
        for piece in pieces:
            cost = self._tokens(piece + separator)
            if used + cost > budget:
                break
            kept.append(piece)
            used += cost
        return kept

    def _longest(self, body, header: str, footer: str, prefix: str, length: int) -> str:
        """``header + body(n) + footer`` for the largest item count n that fits ``length`` with the chat template
        and the answer ``prefix`` (bisection)."""
        budget = length - self._template - self._tokens(prefix)
        low, high = 12, 4 * length
        while high - low > 1:
            middle = (low + high) // 2
            if self._tokens(header + body(middle) + footer) <= budget:
                low = middle
            else:
                high = middle
        return header + body(low) + footer

    def _haystack(self, rng: random.Random, length: int, needles: list[str], question: str) -> str:
        """Essay sentences from a random start, ``needles`` inserted at random depths, within the budget."""
        start = rng.randrange(len(self._essay_sentences))
        pool = self._essay_sentences[start:] + self._essay_sentences[:start]
        sentences = self._fit(pool, length, " ".join(needles) + question)
        for needle in needles:
            sentences.insert(rng.randint(0, len(sentences)), needle)
        return " ".join(sentences)

    def _sample(self, task, length, index, context, prefix, answers, max_new_tokens) -> Sample:
        return Sample(task=task, length=length, index=index, context=context, answer_prefix=prefix,
                      answers=tuple(answers), max_new_tokens=max_new_tokens)

    # -- needle in a haystack ---------------------------------------------------------------------------------

    def _niah(self, rng, length, index, task, keys_total, values_per_key, keys_asked) -> Sample:
        keys = rng.sample(_KEYS, keys_total)
        values = {key: [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(values_per_key)] for key in keys}
        needles = [f"One of the special magic numbers for {key} is: {value}." for key in keys for value in values[key]]
        asked = keys[:keys_asked]
        if keys_asked > 1:
            names = ", ".join(asked[:-1]) + f" and {asked[-1]}"
            question = f"What are the special magic numbers for {names} mentioned in the provided text?"
            prefix = f"The special magic numbers for {names} mentioned in the provided text are"
        elif values_per_key > 1:
            question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic numbers for {asked[0]} mentioned in the provided text are"
        else:
            question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
        intro = "A special magic number is hidden within the following text. Make sure to memorize it.\n\n"
        context = intro + self._haystack(rng, length, needles, intro + question + prefix) + "\n\n" + question
        answers = [value for key in asked for value in values[key]]
        return self._sample(task, length, index, context, prefix, answers, 12 * len(answers))

    def _niah_single(self, rng, length, index):
        return self._niah(rng, length, index, "niah_single", 1, 1, 1)

    def _niah_multikey(self, rng, length, index):
        return self._niah(rng, length, index, "niah_multikey", 4, 1, 1)

    def _niah_multivalue(self, rng, length, index):
        return self._niah(rng, length, index, "niah_multivalue", 1, 2, 1)

    def _niah_multiquery(self, rng, length, index):
        return self._niah(rng, length, index, "niah_multiquery", 2, 1, 2)

    # -- variable tracking ------------------------------------------------------------------------------------

    def _vt(self, rng, length, index):
        # RULER's variable tracking with one hop: a number assigned to one variable, then passed to a second one,
        # hidden in the essays. As in RULER the answer prefix names the value; the answers are both variables.
        names = [name.upper() for name in rng.sample(_KEYS, 2)]
        value = str(rng.randrange(10_000, 100_000))
        needles = [f"VAR {names[0]} = {value}.", f"VAR {names[1]} = VAR {names[0]}."]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain of variable assignments in the text above, the variables "
                  f"assigned the value {value} are: VAR")
        intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
        start = rng.randrange(len(self._essay_sentences))
        pool = self._essay_sentences[start:] + self._essay_sentences[:start]
        sentences = self._fit(pool, length, " ".join(needles) + question + prefix + intro)
        positions = sorted(rng.randint(0, len(sentences)) for _ in needles)
        for offset, (position, needle) in enumerate(zip(positions, needles)):
            sentences.insert(position + offset, needle)  # the chain keeps its order
        context = intro + " ".join(sentences) + "\n\n" + question
        return self._sample("vt", length, index, context, prefix, names, 16)

    # -- word extraction --------------------------------------------------------------------------------------

    def _cwe(self, rng, length, index):
        common = rng.sample(_WORDS, 3)
        rare = [w for w in _WORDS if w not in common]
        question = "What are the 3 most common words in the above list?"
        prefix = "Answer: The top 3 words that appear most often in the list are:\n1."
        header = "Below is a numbered list of words. In these words, some appear more often than others. " \
                 "Memorize the ones that appear most often.\n"

        def listing(items: int) -> str:
            words = [common[i % 3] for i in range(items * 3 // 4)] + [rng.choice(rare) for _ in range(items - items * 3 // 4)]
            random.Random(items).shuffle(words)  # common words: 1/4 of the list each; each rare word ~0.5 %
            return "\n".join(f"{i + 1}. {word}" for i, word in enumerate(words))

        text = self._longest(listing, header, "\n\n" + question, prefix, length)
        return self._sample("cwe", length, index, text, prefix, common, 24)

    def _fwe(self, rng, length, index):
        vocabulary = rng.sample(_WORDS, len(_WORDS))
        # three frequent words (32, 30, 28 % of the text), the others share the remaining 10 %
        weights = [0.32, 0.30, 0.28] + [0.10 / (len(vocabulary) - 3)] * (len(vocabulary) - 3)
        question = "What are the 3 most frequently appeared words in the above coded text?"
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:\n1."
        header = "Read the following coded text and track the frequency of each coded word. Find the three most " \
                 "frequently appeared coded words.\n"
        words = rng.choices(vocabulary, weights=weights, k=4 * length)
        text = self._longest(lambda count: " ".join(words[:count]), header, "\n\n" + question, prefix, length)
        return self._sample("fwe", length, index, text, prefix, vocabulary[:3], 24)

    # -- retrieval QA -----------------------------------------------------------------------------------------

    def _qa(self, rng, length, index):
        # Three facts about different people planted in one of the three haystacks (in turn); one is asked.
        corpus = ("paul-graham", "shakespeare", "kjv")[index % 3]
        people = rng.sample(_PEOPLE, 3)
        attribute = rng.choice(_ATTRIBUTES)
        values = rng.sample(_WORDS, 3)
        facts = [f"The {attribute} of {person} is {value}." for person, value in zip(people, values)]
        question = f"What is the {attribute} of {people[0]}?"
        prefix = f"The {attribute} of {people[0]} is"
        sentences = self._corpus_sentences(corpus)
        start = rng.randrange(len(sentences))
        pool = sentences[start:] + sentences[:start]
        kept = self._fit(pool, length, " ".join(facts) + question + prefix + "Read the following text.")
        for fact in facts:
            kept.insert(rng.randint(0, len(kept)), fact)
        context = "Read the following text.\n\n" + " ".join(kept) + "\n\n" + question
        return self._sample("qa", length, index, context, prefix, [values[0]], 8)

    def _corpus_sentences(self, corpus: str) -> list[str]:
        if corpus not in self._sentences:
            text = " ".join(load_documents(corpus))
            self._sentences[corpus] = _sentences(" ".join(text.split()))
        return self._sentences[corpus]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
