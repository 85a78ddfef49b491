"""The chat prompt set of the SmolLM2 pair: questions, code, maths and summaries.

``chat.json`` (committed next to this module) holds a ``train`` split, the prompts whose
SmolLM2 answers the drafter is distilled from, and a held-out ``test`` split that the
acceptance table and live runs use. Both are made by :func:`build` from templates and, for
summaries, from docstrings of the standard library; since docstrings change between Python
versions the JSON is committed rather than rebuilt (``python -m
multispin_env.live.chat_prompts`` rewrites it). Train and test share no topic, task or
passage.
"""

from __future__ import annotations

import importlib
import json
from importlib import resources
from pathlib import Path

import numpy as np

CATEGORIES = ("qa", "code", "math", "summary")

_TOPICS = """photosynthesis; gravity; the water cycle; plate tectonics; the immune system;
black holes; the French Revolution; the printing press; democracy; inflation; supply and demand;
climate change; the theory of evolution; DNA; vaccines; the internet; electricity; magnetism;
volcanoes; earthquakes; the Roman Empire; the Renaissance; the Industrial Revolution; the moon;
the solar system; rainbows; tides; the human heart; sleep; nutrition; exercise; meditation;
machine learning; cryptography; recycling; renewable energy; nuclear power; the stock market;
compound interest; the Olympic Games; jazz music; impressionist painting; Shakespeare; the Nile;
the Amazon rainforest; coral reefs; bees; migration of birds; the speed of light; atoms;
chemical bonds; antibiotics; the brain; memory; language learning; the Great Wall of China;
the pyramids of Egypt; the Cold War; the Moon landing; electric cars; batteries; solar panels;
wind turbines; clouds; snow; deserts; oceans; glaciers; the ozone layer; bacteria; viruses;
fungi; the periodic table; friction; sound waves; telescopes; microscopes; the calendar;
time zones; maps; money; taxes; banks; cooking pasta; baking bread; coffee; tea; chocolate;
the Eiffel Tower; the Mona Lisa; chess; football; marathons; public libraries; newspapers;
photography; cinema; video games; smartphones; satellites; GPS; rockets; airplanes; bicycles;
trains; bridges; skyscrapers; cities; farming; rice; wheat; forests; wolves; whales; elephants;
penguins; dinosaurs; fossils; the Ice Age; the Silk Road; the Vikings; ancient Greece;
the Byzantine Empire; the Mongol Empire; the printing of money; open-source software;
operating systems; databases; cloud computing; programming languages; algorithms; robots""".replace(
    "\n", " "
)
_QA = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Give me three interesting facts about {t}.",
    "Why is {t} important?",
    "How would you describe {t} to a ten-year-old?",
    "What are common misconceptions about {t}?",
)
_TASKS = """reverses a string; checks whether a number is prime; computes the factorial of n;
returns the n-th Fibonacci number; counts the vowels in a string; removes duplicates from a list
while keeping order; merges two sorted lists; finds the largest element of a list; checks whether
a string is a palindrome; converts Celsius to Fahrenheit; sums the digits of an integer; flattens
a nested list; counts word frequencies in a text; returns the greatest common divisor of two
numbers; sorts a list of dictionaries by a key; reads a CSV file and prints each row; checks
whether two strings are anagrams; computes the mean and median of a list; capitalizes every word
of a sentence; finds all even numbers in a list; implements binary search; validates an email
address with a regular expression; returns the second largest number in a list; rotates a list
by k positions; converts a decimal number to binary; computes the power set of a set; checks
balanced parentheses; transposes a matrix; generates a random password; counts lines in a file;
implements a stack class; implements a queue with two stacks; computes the area of a circle;
finds the longest word in a sentence; merges two dictionaries; chunks a list into pieces of size
n; computes a running total; checks for a leap year; converts a Roman numeral to an integer;
returns the intersection of two lists""".replace("\n", " ")
_CODE = (
    "Write a Python function that {t}.",
    "Write a short Python program that {t}, and explain how it works.",
    "How do I write a JavaScript function that {t}?",
    "Show me a Python one-liner or short snippet that {t}.",
)


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(";") if s.strip()]


def _math(rng: np.random.Generator, n: int) -> list[str]:
    forms = [
        lambda a, b, c: f"What is {a} + {b}?",
        lambda a, b, c: f"What is {a} times {b}?",
        lambda a, b, c: f"What is {a * b} divided by {b}?",
        lambda a, b, c: f"Solve for x: {a}x + {b} = {a * c + b}.",
        lambda a, b, c: (
            f"A shop sells pencils for {b} cents each. How much do {a} pencils cost in cents?"
        ),
        lambda a, b, c: (
            f"Anna has {a + b} apples and gives {b} to her friend. How many apples does she have "
            "left?"
        ),
        lambda a, b, c: f"What is {c}% of {a * 10}?",
        lambda a, b, c: (
            f"A train travels at {a} km per hour for {c} hours. How far does it travel?"
        ),
        lambda a, b, c: f"What is the area of a rectangle that is {a} cm long and {b} cm wide?",
        lambda a, b, c: f"Is {a * 2 + 1} a prime number? Explain.",
    ]
    out = []
    for i in range(n):
        a, b, c = (int(v) for v in rng.integers(2, 60, size=3))
        out.append(forms[i % len(forms)](a, b, c))
    return out


def _passages() -> list[str]:
    """First paragraphs (200-900 characters) of standard-library docstrings."""
    import pkgutil
    import sysconfig

    names = sorted(
        m.name
        for m in pkgutil.iter_modules([sysconfig.get_paths()["stdlib"]])
        if not m.name.startswith(("_", "test", "idle", "tkinter", "turtledemo", "antigravity"))
        and m.name not in {"this", "pydoc_data"}
    )
    out = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform modules that do not import here
            continue
        docs = [mod.__doc__ or ""] + [
            getattr(getattr(mod, a, None), "__doc__", "") or ""
            for a in sorted(getattr(mod, "__all__", []) or [])[:6]
            if not isinstance(getattr(mod, a, None), int | float | str | bytes | tuple)
        ]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            text = " ".join(" ".join(p for p in doc.strip().split("\n\n")[:2]).split())
            if 200 <= len(text) <= 900 and text not in out:
                out.append(text)
    return out


_SUMMARY = (
    "Summarize the following text in one sentence:\n\n{t}",
    "What is the main point of this passage?\n\n{t}",
    "Explain this documentation in plain words:\n\n{t}",
)


def build(test_per_category: int = 12, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    topics, tasks = _split(_TOPICS), _split(_TASKS)
    passages = _passages()
    for pool in (topics, tasks, passages):
        rng.shuffle(pool)
    n_topic, n_task, n_pass = (
        max(test_per_category, len(p) // 8) for p in (topics, tasks, passages)
    )
    splits = {"train": [], "test": []}

    def add(split, category, templates, items):
        for i, item in enumerate(items):
            for j in range(len(templates) if split == "train" else 1):
                k = (i + j) % len(templates)
                splits[split].append({"category": category, "prompt": templates[k].format(t=item)})

    add("test", "qa", _QA, topics[:n_topic][:test_per_category])
    add("train", "qa", _QA, topics[n_topic:])
    add("test", "code", _CODE, tasks[:n_task][:test_per_category])
    add("train", "code", _CODE, tasks[n_task:])
    add("test", "summary", _SUMMARY, passages[:n_pass][:test_per_category])
    add("train", "summary", _SUMMARY[:2], passages[n_pass:])
    maths = _math(rng, 400 + test_per_category)
    train_maths = maths[test_per_category:]
    # random numbers can repeat a question: held-out ones must not be among the training ones
    test_maths = list(dict.fromkeys(p for p in maths[:test_per_category] if p not in train_maths))
    while len(test_maths) < test_per_category:
        extra = _math(rng, test_per_category)
        test_maths += [p for p in extra if p not in train_maths and p not in test_maths]
    splits["test"] += [{"category": "math", "prompt": p} for p in test_maths[:test_per_category]]
    splits["train"] += [{"category": "math", "prompt": p} for p in train_maths]
    return splits


def prompt_file() -> Path:
    return Path(str(resources.files("multispin_env") / "live" / "prompts" / "chat.json"))


def load(split: str = "test") -> list[dict]:
    """The committed prompts of ``split`` ("train" or "test"), each ``{category, prompt}``."""
    data = json.loads(prompt_file().read_text())
    if split not in data:
        raise ValueError(f"split must be one of {sorted(data)}, not {split!r}")
    return data[split]


if __name__ == "__main__":
    data = build()
    prompt_file().write_text(json.dumps(data, indent=1) + "\n")
    for split, rows in data.items():
        counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
        print(split, len(rows), counts)
