"""Four-choice exams (MMLU, C-Eval, CMMLU) as the Qwen-7B release scores them.

Base mode, 5-shot: the subject's first five dev questions with their answers, then the question, and
the answer read from the next-token distribution at the last position: softmax over the vocabulary,
the probabilities of the four choice tokens, softmax again over those four, argmax (ties: the first).
MMLU's choice tokens are " A".." D" after "Answer:"; C-Eval's and CMMLU's "A".."D" after "答案：". A
prompt longer than the window keeps its last max_seq_len - 1 tokens (MMLU's rule, used for all three;
counted in the results).

Chat mode, 0-shot: the release's chat prompt through the chat template, greedy, and the letter read
from the reply as evaluate_chat_mmlu.py / evaluate_chat_ceval.py read it (CMMLU, which has no chat script,
as C-Eval): for C-Eval the question restated around its blank replaced ("答案是" / ""), the choice texts
replaced by their letters, then a cascade of patterns ("the answer is X" / 答案是X, "X is correct" /
X选项正确, a leading letter, the first standalone letter), then the choice whose text is most like the reply.

Metrics: MMLU is the accuracy over all questions, with its four categories; C-Eval and CMMLU the mean
of the subjects' accuracies, and each category the mean of its subjects': C-Eval's four and its "hard"
subjects, CMMLU's four and "China specific" (whose subjects also count in their main category).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from . import data
from .data import LETTERS

MMLU_CATEGORIES = {
    "STEM": ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"],
    "Humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
    "Other": ["business_ethics", "college_medicine", "human_aging", "management", "marketing", "medical_genetics",
              "miscellaneous", "nutrition", "professional_accounting", "professional_medicine", "virology",
              "global_facts", "clinical_knowledge"],
    "Social Sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"],
}
CEVAL_CATEGORIES = {
    "STEM": ["computer_network", "operating_system", "computer_architecture", "college_programming",
             "college_physics", "college_chemistry", "advanced_mathematics", "probability_and_statistics",
             "discrete_mathematics", "electrical_engineer", "metrology_engineer", "high_school_mathematics",
             "high_school_physics", "high_school_chemistry", "high_school_biology", "middle_school_mathematics",
             "middle_school_biology", "middle_school_physics", "middle_school_chemistry", "veterinary_medicine"],
    "Social Science": ["college_economics", "business_administration", "marxism", "mao_zedong_thought",
                       "education_science", "teacher_qualification", "high_school_politics", "high_school_geography",
                       "middle_school_politics", "middle_school_geography"],
    "Humanities": ["modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
                   "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
                   "high_school_chinese", "high_school_history", "middle_school_history"],
    "Other": ["civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
              "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
              "tax_accountant", "physician"],
}
CEVAL_HARD = ["advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_physics",
              "college_chemistry", "high_school_mathematics", "high_school_physics", "high_school_chemistry"]
# evaluate_cmmlu.py's TASK_NAME_MAPPING (its subcategories grouped by categories, the same as haonan-li/CMMLU's
# src/categories.py): the 15 China-specific subjects count in "China specific" and in their main category.
CMMLU_CATEGORIES = {
    "STEM": ["anatomy", "astronomy", "college_actuarial_science", "college_engineering_hydrology",
             "college_mathematics", "college_medical_statistics", "computer_science", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "genetics", "high_school_biology",
             "high_school_chemistry", "high_school_mathematics", "high_school_physics", "machine_learning", "virology"],
    "Humanities": ["arts", "chinese_history", "chinese_literature", "college_law", "global_facts",
                   "international_law", "jurisprudence", "logical", "marxist_theory", "philosophy",
                   "professional_law", "world_history", "world_religions"],
    "Social Science": ["ancient_chinese", "business_ethics", "chinese_civil_service_exam", "chinese_food_culture",
                       "chinese_foreign_policy", "chinese_teacher_qualification", "college_education", "economics",
                       "education", "elementary_chinese", "ethnology", "high_school_geography",
                       "high_school_politics", "journalism", "management", "marketing", "modern_chinese",
                       "professional_accounting", "professional_psychology", "public_relations", "security_study",
                       "sociology"],
    "Other": ["agronomy", "chinese_driving_rule", "clinical_knowledge", "college_medicine", "computer_security",
              "construction_project_management", "elementary_commonsense", "elementary_information_and_technology",
              "food_science", "human_sexuality", "legal_and_moral_basis", "nutrition", "professional_medicine",
              "sports_science", "traditional_chinese_medicine"],
    "China specific": ["ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule",
                       "chinese_food_culture", "chinese_foreign_policy", "chinese_history", "chinese_literature",
                       "chinese_teacher_qualification", "construction_project_management", "elementary_chinese",
                       "elementary_commonsense", "ethnology", "high_school_politics", "modern_chinese",
                       "traditional_chinese_medicine"],
}
SHOTS = 5
MMLU_CHAT_INSTRUCTION = ("The following is a multiple-choice question. Please choose the most suitable one among A, "
                         "B, C and D as the answer to this question.\n\n")


@dataclass(frozen=True)
class ChoiceTask:
    name: str
    question_word: str      # "Question: " / "问题："
    answer_word: str        # "Answer:" / "答案："
    choice_tokens: tuple[str, ...]  # what follows answer_word for each letter
    categories: dict[str, list[str]]
    mean_of_subjects: bool  # C-Eval / CMMLU: the mean of per-subject accuracies; MMLU: over all questions
    hard: tuple[str, ...] = ()

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        subjects, files = self._read(data_dir)
        items = []
        for subject, (dev, questions) in subjects.items():
            for i, q in enumerate(questions):
                items.append({"id": f"{subject}/{i}", "subject": subject, "question": q.question,
                              "choices": list(q.choices), "answer": q.answer,
                              "shots": [[s.question, list(s.choices), s.answer] for s in dev[:SHOTS]]})
        return items, files

    def _read(self, data_dir):
        if self.name == "mmlu":
            return data.mmlu(data_dir, [s for group in self.categories.values() for s in group])
        if self.name == "ceval":
            return data.local_choice_task("C-Eval", data_dir, ("dev", "val"), "{subject}_{split}.csv",
                                          data.CEVAL_COLUMNS, None, "ceval-exam.zip (https://cevalbenchmark.com)")
        return data.local_choice_task("CMMLU", data_dir, ("dev", "test"), "{subject}.csv", data.CMMLU_COLUMNS, None,
                                      "cmmlu_v1_0_1.zip (https://github.com/haonan-li/CMMLU)")

    # ---------------------------------------------------------------- prompts
    def example(self, question: str, choices, answer: str | None) -> str:
        text = self.question_word + question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices))
        if answer is None:
            return text + "\n" + self.answer_word
        return text + "\n" + self.answer_word + (" " if self.name == "mmlu" else "") + answer + "\n\n"

    def base_prompt(self, item: dict) -> str:
        head = ""
        if self.name == "mmlu":
            subject = item["subject"].replace("_", " ")
            head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shots = "".join(self.example(q, c, a) for q, c, a in item["shots"])
        return head + shots + self.example(item["question"], item["choices"], None)

    def chat_prompt(self, item: dict) -> str:
        options = "".join(f"{letter}. {c}\n" for letter, c in zip(LETTERS, item["choices"]))
        if self.name == "mmlu":
            return MMLU_CHAT_INSTRUCTION + item["question"] + "\n" + options
        return item["question"] + "\n\n" + options

    # Chat mode is a generation task: these are what the runner asks of one.
    max_new_tokens = 512

    def prompt(self, item: dict, mode: str) -> str:
        return self.chat_prompt(item)

    def stop(self, mode: str) -> tuple[str, ...]:
        return ()

    def judge(self, item: dict, reply: str, mode: str) -> dict:
        prediction = extract_choice(reply, item, chinese=self.name != "mmlu")
        return {"response": reply, "prediction": prediction, "correct": prediction == item["answer"]}

    # ---------------------------------------------------------------- scoring
    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        by_subject: dict[str, list[bool]] = {}
        for item in items:
            by_subject.setdefault(item["subject"], []).append(records[item["id"]]["correct"])
        accuracy = {s: 100 * sum(v) / len(v) for s, v in by_subject.items()}

        def pooled(subjects):
            if self.mean_of_subjects:
                values = [accuracy[s] for s in subjects if s in accuracy]
                return sum(values) / len(values) if values else None
            counts = [c for s in subjects for c in by_subject.get(s, [])]
            return 100 * sum(counts) / len(counts) if counts else None

        result = {"score": pooled(list(accuracy)), "questions": len(items),
                  "categories": {c: v for c, subjects in self.categories.items()
                                 if (v := pooled(subjects)) is not None},
                  "subjects": accuracy}
        if self.hard and (hard := pooled(self.hard)) is not None:
            result["hard"] = hard
        return result


MMLU = ChoiceTask("mmlu", "Question: ", "Answer:", (" A", " B", " C", " D"), MMLU_CATEGORIES, False)
CEVAL = ChoiceTask("ceval", "问题：", "答案：", LETTERS, CEVAL_CATEGORIES, True, tuple(CEVAL_HARD))
CMMLU = ChoiceTask("cmmlu", "问题：", "答案：", LETTERS, CMMLU_CATEGORIES, True)


# ------------------------------------------------------------------ reading a letter from a chat reply
# As the release's chat scripts read a reply: MMLU as eval/evaluate_chat_mmlu.py, C-Eval as evaluate_chat_ceval.py.
# The release has no chat script for CMMLU; its replies are read as C-Eval's (the same language and prompt).

# evaluate_chat_mmlu.py's extract_choice, in its order: "answer is X" / "choose X" (not after "not" / "n't"),
# "X is correct" / "X is right" (likewise), a reply that is a letter, the first letter standing alone.
ENGLISH_PATTERNS = [
    r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)"
    r"[^ABCD]{0,20}?\b(A|B|C|D)\b",
    r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
    r"^(A|B|C|D)(?:\.|,|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
# evaluate_chat_ceval.py's: 答案是X / 选项为X / 选X (not after 不 / 非), X选项正确 / X符合题意 (likewise), a reply that
# starts with a letter, the first letter standing alone.
CHINESE_PATTERNS = [
    r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))"
    r"[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?"
    r"(?:正确|对[的，。：]|符合)",
    r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]


def extract_choice(reply: str, item: dict, chinese: bool) -> str:
    """The letter ("A" .. "D") a chat reply picks for `item` (its question and choices), read as
    evaluate_chat_ceval.py reads C-Eval's replies (`chinese`) or as evaluate_chat_mmlu.py reads MMLU's: the
    question (C-Eval) and the choices' texts replaced in the reply, the first pattern that matches, else the
    choice most like the reply."""
    text = without_question(reply, item["question"]) if chinese else reply
    text = choices_as_letters(text, item["choices"], chinese)
    for pattern in CHINESE_PATTERNS if chinese else ENGLISH_PATTERNS:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return closest_choice(text, item["choices"])


def without_question(reply: str, question: str) -> str:
    """evaluate_chat_ceval.py's process_before_extraction, first half: a reply restating the question's last
    sentence with the blank filled in ("特性是____。" → "特性是既保证可靠…") reads "答案是既保证可靠…": the text
    before the blank becomes "答案是", the text after it goes, each only when longer than four characters. A
    question without a blank: its whole last sentence becomes "答案是"."""
    pieces = question.rstrip("。").split("。")[-1].split("_")
    if len(pieces[0].strip()) > 4:
        reply = reply.replace(pieces[0], "答案是")
    if len(pieces[-1].strip()) > 4:
        reply = reply.replace(pieces[-1], "")
    return reply


def choices_as_letters(reply: str, choices, chinese: bool) -> str:
    """Each choice's text in the reply replaced by its letter, the longest first (equal lengths in letter order):
    as written less a final "。" (evaluate_chat_ceval.py), or in any case less a final "." (evaluate_chat_mmlu.py).
    Even a one-character choice is replaced everywhere, as there; an empty one is skipped (it would put its letter
    between every two characters)."""
    for letter, choice in sorted(zip(LETTERS, choices), key=lambda lc: len(lc[1]), reverse=True):
        body = choice.rstrip("。" if chinese else ".")
        if body:
            reply = reply.replace(body, letter) if chinese else re.sub(re.escape(body), letter, reply,
                                                                       flags=re.IGNORECASE)
    return reply


def fuzz_form(text: str) -> str:
    # thefuzz's default processor: letters and digits, the rest spaces, lower case, trimmed
    return "".join(c if c.isalnum() else " " for c in text).lower().strip()


def closest_choice(text: str, choices) -> str:
    """The letter of the choice most like the text (the first of equals). The release asks thefuzz's
    process.extractOne (its WRatio, a blend of whole, partial and token-order ratios); this is difflib's ratio of
    the two texts as thefuzz's default processor leaves them."""
    ratios = [difflib.SequenceMatcher(None, fuzz_form(text), fuzz_form(c)).ratio() for c in choices]
    return LETTERS[max(range(4), key=lambda i: ratios[i])]
