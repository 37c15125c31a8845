"""A diverse, hand-written instruction set for self-distilling a draft head (tools/train_head.py).

Templates x topics, plus small hand-written passages (to summarize, rewrite, translate), code tasks and math
word problems with generated numbers. Written for this purpose only: nothing here comes from a benchmark.

    python tools/head_prompts.py --n 600 --out /tmp/head_prompts.jsonl
"""
from __future__ import annotations

import argparse
import json
import random

TOPICS = [
    "volcanoes", "honeybees", "the water cycle", "black holes", "the Roman Empire", "photosynthesis",
    "electric cars", "coffee", "the human heart", "machine learning", "the moon landing", "sourdough bread",
    "recycling", "the stock market", "octopuses", "the printing press", "climate change", "chess",
    "vaccines", "the internet", "coral reefs", "the French Revolution", "solar panels", "sleep",
    "earthquakes", "jazz music", "the Great Wall of China", "antibiotics", "rainbows", "inflation",
    "penguins", "the Olympic Games", "DNA", "tea ceremonies", "hurricanes", "the Renaissance",
    "wind turbines", "meditation", "glaciers", "the immune system", "bicycles", "ancient Egypt",
    "cryptography", "mushrooms", "public libraries", "tides", "the periodic table", "video games",
    "rainforests", "the Silk Road", "batteries", "migratory birds", "origami", "the metric system",
    "submarines", "gardening", "telescopes", "the Industrial Revolution", "dinosaurs", "budgeting",
    "wolves", "chocolate", "satellites", "marathon running", "bridges", "lighthouses", "bread baking",
    "nuclear power", "the Amazon river", "trains", "the human brain", "snowflakes", "elephants",
]

AUDIENCES = ["a ten-year-old", "a busy executive", "a high-school student", "my grandmother", "a complete beginner",
             "a university student", "a tourist", "a new employee"]

TEMPLATES = [
    "Explain {t} to {a}.",
    "Write a short story that involves {t}.",
    "Give me five interesting facts about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a haiku about {t}.",
    "Write a short poem about {t}.",
    "Summarize the history of {t} in one paragraph.",
    "List three common misconceptions about {t} and correct them.",
    "Write a blog post introduction about {t}.",
    "Create a quiz with three multiple-choice questions about {t}.",
    "How would you teach a class about {t}? Give a lesson outline.",
    "Write a persuasive paragraph arguing that everyone should learn about {t}.",
    "What are some good questions to ask an expert on {t}?",
    "Describe {t} using a simple analogy.",
    "Write a dialogue between two friends discussing {t}.",
    "Write a product description for a board game about {t}.",
    "Give a step-by-step explanation of how {t} works.",
    "Write a tweet about {t}.",
    "What is the future of {t}? Give a few predictions.",
    "Write a limerick about {t}.",
    "Compare {t} and {u}.",
    "Write a news headline and a short article about a discovery related to {t}.",
    "Give me a list of books or resources to learn about {t}.",
    "Why is {t} important? Answer in three sentences.",
    "Write an email to a colleague inviting them to a talk about {t}.",
    "Write a short speech for a school assembly about {t}.",
    "Write a children's bedtime story about {t}.",
    "What careers are related to {t}?",
    "Describe a day in the life of someone who works with {t}.",
    "Write a FAQ with four questions and answers about {t}.",
]

EMAILS = [
    "Write an email to my landlord asking to fix a leaking kitchen tap.",
    "Write a polite email declining a job offer.",
    "Write an email to a teacher asking for an extension on an essay.",
    "Write a thank-you email after a job interview for a marketing role.",
    "Write an email to a customer apologizing for a delayed shipment.",
    "Write an email to the team announcing a new weekly meeting time.",
    "Write a short email asking a friend to return a borrowed book.",
    "Write an email requesting a refund for a broken coffee machine.",
    "Write an out-of-office reply for a two-week holiday.",
    "Write an email to a neighbour about a lost cat.",
    "Write a cover letter for a junior software developer position.",
    "Write an email inviting volunteers to a beach clean-up on Saturday.",
    "Write a reminder email about an unpaid invoice.",
    "Write a message congratulating a coworker on their promotion.",
    "Write an email to a hotel asking whether pets are allowed.",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the vowels in a string", "finds the largest element in a list",
    "removes duplicates from a list while keeping order", "checks whether a word is a palindrome",
    "sorts a list of dictionaries by a key", "merges two sorted lists", "converts Celsius to Fahrenheit",
    "reads a text file and counts the words", "computes the average of a list of numbers",
    "implements binary search", "flattens a nested list", "returns the greatest common divisor of two numbers",
    "counts how often each word appears in a sentence", "checks whether two strings are anagrams",
    "generates a random password", "transposes a matrix", "validates an email address with a regular expression",
    "implements a simple stack class", "finds the second smallest number in a list", "computes a running sum",
]
LANGS = ["Python", "JavaScript", "Python", "C", "Java", "Rust", "Go", "Python"]
CODE_TEMPLATES = [
    "Write a {l} function that {c}.",
    "Write a {l} function that {c}, and explain how it works.",
    "Show me how to write a program in {l} that {c}. Include a short example.",
]
CODE_SNIPPETS = [
    "def add(a, b):\n    return a - b",
    "for i in range(10):\n    if i % 2 = 0:\n        print(i)",
    "def mean(xs):\n    return sum(xs) / len(xs)",
    "x = [1, 2, 3]\nfor i in range(len(x) + 1):\n    print(x[i])",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 5;",
    "const total = items.reduce((acc, item) => acc + item.price, 0);",
    "def greet(name):\n    print('Hello, ' + name)\n\ngreet('Ada')",
    "while True:\n    line = input()\n    if line == 'quit':\n        break",
]
CODE_SNIPPET_TEMPLATES = ["Explain what this code does:\n\n{s}", "Find the bug in this code and fix it:\n\n{s}",
                          "Add comments to this code:\n\n{s}"]

PASSAGES = [
    "The town of Millbrook sits at the bend of a slow river. For two centuries its mill ground wheat for the "
    "farms around it, but when the railway arrived the mill closed and the town shrank. Today the old mill is a "
    "museum, and every autumn the town holds a harvest fair that draws visitors from across the region.",
    "Researchers studied how often office workers took short breaks. Workers who stood up and walked for five "
    "minutes every hour reported less back pain and felt more focused in the afternoon than workers who stayed "
    "seated. The researchers suggest that companies encourage regular movement during the workday.",
    "The city council voted to turn three downtown parking lots into small parks. Supporters said the parks "
    "would cool the streets in summer and give residents places to meet. Shop owners worried about losing "
    "customers who drive, so the council promised a new parking garage near the train station.",
    "Maria learned to play the violin at the age of forty. She practised every morning before work, first "
    "scales and then simple songs. After two years she joined a community orchestra, and last spring she played "
    "her first concert in front of her family.",
    "A new species of frog was found in the mountains of the island. It is smaller than a fingernail and "
    "lives in moss near waterfalls. Scientists fear that its habitat is threatened by road building and are "
    "asking the government to protect the area.",
    "The company released its new phone on Tuesday. It has a larger battery, a brighter screen and a camera "
    "that works better in low light. Reviewers praised the battery life but said the price is too high for "
    "most buyers.",
    "Every winter, thousands of cranes stop at the lake on their way south. Local volunteers count the birds "
    "and record their health. This year the count was the highest in a decade, which volunteers credit to the "
    "wetland restoration project finished three years ago.",
    "The library started lending tools as well as books. Members can now borrow drills, ladders and sewing "
    "machines for a week at a time. The program has been so popular that the library plans to add gardening "
    "equipment next year.",
]
PASSAGE_TEMPLATES = ["Summarize the following text in one sentence:\n\n{p}", "Summarize this passage:\n\n{p}",
                     "Write three questions about this text:\n\n{p}", "Rewrite this text for a young child:\n\n{p}",
                     "What is the main idea of this paragraph?\n\n{p}", "Give this text a title:\n\n{p}"]

SENTENCES = ["The weather is beautiful today.", "Where is the nearest train station?", "I would like a cup of tea, please.",
             "My brother plays football every Sunday.", "The museum opens at nine o'clock.",
             "Can you help me find my keys?", "We are going to the beach tomorrow.", "This book is very interesting.",
             "I have been learning to cook.", "The children are playing in the garden."]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]

NAMES = ["Anna", "Ben", "Carlos", "Dina", "Eli", "Fatima", "George", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
ITEMS = [("apples", "a bag"), ("pencils", "a box"), ("stickers", "a sheet"), ("cookies", "a jar"), ("marbles", "a bag")]


def _math(rng: random.Random) -> str:
    n, m = rng.choice(NAMES), rng.choice(NAMES)
    item, _ = rng.choice(ITEMS)
    a, b, c = rng.randint(5, 60), rng.randint(2, 20), rng.randint(2, 9)
    forms = [
        f"{n} has {a} {item}. {n} gives {b} to {m} and then buys {c} more. How many {item} does {n} have now?",
        f"A train travels {a * 5} kilometres in {c} hours. What is its average speed?",
        f"A shirt costs ${a} and is on sale for {b * 5}% off. What is the sale price?",
        f"{n} reads {b} pages a day. How many days will it take to finish a book with {a * 10} pages?",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        f"There are {a} students in a class and {c} groups. If the students are split as evenly as possible, "
        f"how many are in each group?",
        f"{n} saves ${b} every week. How much will {n} have saved after {a} weeks?",
        f"If {c} workers can build a wall in {b} days, how long would it take {c * 2} workers?",
        f"What is {a} multiplied by {b}, plus {c}? Show your steps.",
        f"Solve for x: {c}x + {b} = {c * a + b}.",
        f"A recipe needs {c} eggs for {b} people. How many eggs are needed for {b * 3} people?",
        f"{n} is {a} years old and {m} is {b} years younger. How old will {m} be in {c} years?",
    ]
    return rng.choice(forms)


GENERAL = [
    "What is the capital of Australia?", "How do I make a cup of green tea?", "Give me tips for a job interview.",
    "What should I pack for a weekend camping trip?", "How can I improve my handwriting?",
    "Suggest five names for a bakery.", "Plan a three-day trip to Rome.", "How do I change a flat tyre?",
    "What are some healthy breakfast ideas?", "How can I be more productive when working from home?",
    "Give me a weekly workout plan for a beginner.", "What is the difference between weather and climate?",
    "How do airplanes stay in the air?", "Write a recipe for vegetable soup.", "How do I start learning the guitar?",
    "What are good habits for saving money?", "Explain the rules of tennis.", "How do I write a good resume?",
    "Suggest a name and a slogan for a cycling club.", "What is a prime number?", "Tell me a joke about computers.",
    "How do I care for a houseplant?", "What are the planets in our solar system?", "How does a refrigerator work?",
    "Write a to-do list for moving to a new apartment.", "What should I consider when buying a used car?",
    "Give me ideas for a birthday party for a seven-year-old.", "How do I politely say no to extra work?",
    "What is the difference between a simile and a metaphor?", "How do I calm down before a presentation?",
    "Write a motivational message for someone starting a new job.", "What are the stages of grief?",
    "Explain what a budget deficit is.", "How do you make a paper airplane?", "What is the Pythagorean theorem?",
    "Write a short review of an imaginary restaurant.", "Describe the taste of a lemon to someone who never had one.",
    "What are the benefits of learning a second language?", "How do vaccines train the immune system?",
    "Give me a packing checklist for a beach holiday.", "What is an API? Give an example.",
    "Write a riddle and give its answer.", "Explain the difference between RAM and storage.",
    "What is the difference between 'affect' and 'effect'?", "Write instructions for brushing teeth properly.",
    "Describe a sunset over the ocean.", "What are three ways to reduce food waste at home?",
    "Explain recursion with an example.", "What is a git commit?", "How does compound interest work?",
]

STYLE_SUFFIX = ["", "", "", "", " Keep it brief.", " Use bullet points.", " Be concise.", " Answer in detail."]


def make_prompts(n: int = 600, seed: int = 0) -> list[str]:
    """`n` distinct prompts, deterministic for a seed, mixed over all task kinds."""
    rng = random.Random(seed)
    pools = []
    for tmpl in TEMPLATES:
        for t in TOPICS:
            u = rng.choice([x for x in TOPICS if x != t])
            pools.append(("topic", tmpl.format(t=t, a=rng.choice(AUDIENCES), u=u)))
    for l in LANGS:
        for c in CODE_TASKS:
            pools.append(("code", rng.choice(CODE_TEMPLATES).format(l=l, c=c)))
    for s in CODE_SNIPPETS:
        for tmpl in CODE_SNIPPET_TEMPLATES:
            pools.append(("code", tmpl.format(s=s)))
    for p in PASSAGES:
        for tmpl in PASSAGE_TEMPLATES:
            pools.append(("passage", tmpl.format(p=p)))
    for s in SENTENCES:
        for lang in LANGUAGES:
            pools.append(("translate", f"Translate into {lang}: \"{s}\""))
    for e in EMAILS:
        pools.append(("email", e))
    for g in GENERAL:
        pools.append(("general", g))
    for _ in range(300):
        pools.append(("math", _math(rng)))
    by_kind: dict[str, list[str]] = {}
    for kind, p in pools:
        by_kind.setdefault(kind, []).append(p)
    for v in by_kind.values():
        rng.shuffle(v)
    # share of each kind in the output
    weights = {"topic": 0.40, "code": 0.15, "math": 0.13, "passage": 0.08, "translate": 0.06, "email": 0.06,
               "general": 0.12}
    out, seen = [], set()
    order = list(weights)
    while len(out) < n:
        kind = rng.choices(order, [weights[k] for k in order])[0]
        if not by_kind[kind]:
            if all(not by_kind[k] for k in order):
                break
            continue
        p = by_kind[kind].pop()
        if kind in ("topic", "general"):
            p += rng.choice(STYLE_SUFFIX)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="-")
    a = ap.parse_args()
    lines = "".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(a.n, a.seed))
    if a.out == "-":
        print(lines, end="")
    else:
        with open(a.out, "w") as f:
            f.write(lines)


if __name__ == "__main__":
    main()
