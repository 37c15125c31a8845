"""A diverse, hand-written instruction set for self-distilling a draft head (tools/train_head.py).

Templates x topics, plus small hand-written passages (to summarize, rewrite, translate), code tasks and math
word problems with generated numbers. Written for this purpose only: nothing here comes from a benchmark.
A second round builds on the model's own first-round answers: follow-up turns, and summaries of its texts.

    python tools/head_prompts.py --n 600 --out /tmp/head_prompts.jsonl
    python tools/head_prompts.py --second-round WORK/gen.jsonl --tokenizer HF/tokenizer.json --n 800 --out /tmp/round2.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

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

# into English (hand-written here): translation prompts mostly ask for English output
FOREIGN = [
    ("German", "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung, weil ein Baum auf den Gleisen liegt."),
    ("German", "Die Stadtbibliothek bleibt wegen Renovierungsarbeiten bis Ende des Monats geschlossen."),
    ("German", "Wir haben am Wochenende einen langen Spaziergang am See gemacht und danach Kuchen gegessen."),
    ("German", "Die Regierung plant, im nächsten Jahr mehr Geld in Schulen und Kindergärten zu investieren."),
    ("German", "Mein Nachbar repariert alte Fahrräder und verschenkt sie an Studenten."),
    ("German", "Das Museum zeigt eine neue Ausstellung über die Geschichte der Seefahrt."),
    ("German", "Wegen des starken Regens wurde das Fußballspiel auf Sonntag verschoben."),
    ("German", "Die Firma hat angekündigt, dass sie in diesem Jahr zweihundert neue Mitarbeiter einstellen wird."),
    ("German", "Kannst du mir sagen, wie ich am schnellsten zum Flughafen komme?"),
    ("German", "Viele Menschen arbeiten inzwischen zwei Tage pro Woche von zu Hause aus."),
    ("French", "Le marché du samedi attire des producteurs de toute la région."),
    ("French", "Les scientifiques ont découvert une nouvelle espèce de poisson dans le lac."),
    ("French", "Je voudrais réserver une table pour quatre personnes ce soir à huit heures."),
    ("French", "La mairie a décidé de planter mille arbres dans le centre-ville."),
    ("French", "Après le concert, nous sommes allés manger une crêpe près de la gare."),
    ("French", "Le prix de l'électricité a augmenté de dix pour cent depuis janvier."),
    ("Spanish", "El nuevo puente conectará los dos barrios y reducirá el tráfico en el centro."),
    ("Spanish", "Mi abuela cocina una paella deliciosa todos los domingos."),
    ("Spanish", "El equipo ganó el campeonato después de diez años sin títulos."),
    ("Spanish", "La escuela ofrece clases de música gratuitas para los niños del barrio."),
    ("Spanish", "¿Sabes a qué hora abre la farmacia los sábados?"),
    ("Italian", "Il festival del cinema si svolgerà a settembre nella piazza principale."),
    ("Italian", "Abbiamo perso l'autobus e siamo arrivati in ritardo alla riunione."),
    ("Portuguese", "A cidade vai construir uma nova ciclovia ao longo do rio."),
]
FOREIGN_TEMPLATES = ["Translate {l} to English: {s}", "Translate the following {l} sentence into English:\n\n{s}",
                     "What does this {l} sentence mean in English? \"{s}\""]

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

# short factual questions (open-domain QA)
QUESTIONS = [
    "Who painted the Mona Lisa?", "When did the Berlin Wall fall?", "What is the longest river in Africa?",
    "Who wrote Pride and Prejudice?", "How many bones are in the adult human body?", "What is the boiling point of water in Fahrenheit?",
    "Which planet has the most moons?", "Who was the first woman to win a Nobel Prize?", "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?", "Who invented the telephone?", "In which year did World War II end?",
    "What is the largest desert in the world?", "Who composed the Four Seasons?", "What does a barometer measure?",
    "Which country has the largest population?", "What is the smallest prime number?", "Who discovered penicillin?",
    "What is the currency of Japan?", "How long does light from the Sun take to reach Earth?", "Who was Cleopatra?",
    "What is the hardest natural material?", "Where is Mount Kilimanjaro?", "What is the speed of sound in air?",
    "Who developed the theory of general relativity?", "What are the three states of matter?",
    "What is the tallest building in the world?", "Which organ produces insulin?", "Who was the first person in space?",
    "What is the main ingredient of guacamole?", "How many players are on a soccer team?", "What is a leap year?",
    "Which ocean is the deepest?", "Who wrote the play Romeo and Juliet?", "What is the capital of Canada?",
    "What causes the seasons on Earth?", "Who founded the city of Alexandria?", "What is the function of red blood cells?",
    "What does HTML stand for?", "How many continents are there, and what are they?",
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
    for lang, sent in FOREIGN:
        for tmpl in FOREIGN_TEMPLATES:
            pools.append(("translate", tmpl.format(l=lang, s=sent)))
    for e in EMAILS:
        pools.append(("email", e))
    for g in GENERAL + QUESTIONS:
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


FOLLOW_UPS = [
    "Can you give me a concrete example?", "Make that shorter.", "Now explain it to a ten-year-old.",
    "Can you expand on the second point?", "Thanks! What should I read next about this?",
    "Rewrite your answer as a bulleted list.", "What are the counterarguments?", "Summarize your answer in one sentence.",
    "Can you make it more formal?", "Give me three follow-up questions I could ask.", "Is any of that a common myth?",
    "How would this be different in another country?", "Turn that into a short poem.",
    "What is the most important thing to remember from this?", "Can you add a title and headings?",
]
OVER_TEXT = [
    "Summarize the following article in three sentences:\n\n{p}", "Summarize this text:\n\n{p}",
    "Write a one-sentence headline for this text:\n\n{p}", "List the key points of this text:\n\n{p}",
    "{p}\n\nBased on the text above, what is the main idea?",
    "Read the passage and answer: what are the most important facts it mentions?\n\n{p}",
    "Rewrite this text in simpler words:\n\n{p}", "Write two questions that this text answers, and answer them.\n\n{p}",
]


def second_round(gen_path: str, tokenizer_json: str, n: int, seed: int = 0) -> list:
    """Prompts that build on a first round's generations (tools/train_head.py's gen.jsonl): a second user turn
    after the model's own answer (multi-turn chat), and summaries / questions over its longer answers (the
    long-context reading tasks). Items are message lists ({"messages": [...]}) or strings."""
    from tokenizers import Tokenizer
    rng = random.Random(seed)
    tok = Tokenizer.from_file(tokenizer_json)
    recs = []
    for line in open(gen_path):
        r = json.loads(line) if line.strip() else None
        if r and isinstance(r["prompt"], str):
            r["text"] = tok.decode(r["response_ids"], skip_special_tokens=True)
            # whole answers of some length, not degenerate repetitions
            if len(r["text"]) > 200 and len(set(r["response_ids"])) > len(r["response_ids"]) // 3:
                recs.append(r)
    rng.shuffle(recs)
    out = []
    for i, r in enumerate(recs):
        if len(out) >= n:
            break
        if i % 2 == 0:
            out.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["text"].strip()},
                                     {"role": "user", "content": rng.choice(FOLLOW_UPS)}]})
        else:
            out.append(rng.choice(OVER_TEXT).format(p=r["text"].strip()))
    return out

# Magpie (Xu et al., 2024): an instruction-tuned model, given its chat template only up to the start of a user
# turn, writes a user turn of the kind it was tuned on. Sampling many gives prompts from the target's own
# instruction distribution, far more varied than templates, with no corpus. Most use the default system prompt;
# some steer toward the reading, coding and math tasks short samples under-represent.
MAGPIE_SYSTEMS = [None] * 6 + [
    "You are an AI assistant. The user pastes a long text (an article, an email, a report) and asks you to "
    "summarize it or to extract information from it.",
    "You are an AI assistant. The user gives you a passage and asks questions that it answers.",
    "You are an AI assistant that helps with programming: writing, explaining and fixing code.",
    "You are an AI assistant that solves math and reasoning problems step by step.",
    "You are an AI assistant that plays a character or scenario the user describes.",
    "You are an AI assistant that translates and rewrites text.",
]


def magpie(hf_dir: str, n: int, out_path: str, seed: int = 0, batch: int = 48, max_tokens: int = 160,
           dtype: str = "bfloat16", log=print) -> int:
    """Sample n user turns from the target itself (appending to out_path, so a stopped run resumes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    seen = set()
    if os.path.isfile(out_path):
        seen = {json.loads(l)["prompt"].lower()[:80] for l in open(out_path) if l.strip()}
    rng = random.Random(seed + len(seen))
    t0, kept, tried = time.time(), len(seen), 0
    with open(out_path, "a") as f:
        while kept < n:
            system = rng.choice(MAGPIE_SYSTEMS)
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "\x00"}]
            text = tok.apply_chat_template(msgs, tokenize=False)
            ids = tok(text[:text.index("\x00")], return_tensors="pt", add_special_tokens=False).input_ids
            torch.manual_seed(rng.randrange(1 << 30))
            with torch.no_grad():
                out = model.generate(input_ids=ids.repeat(batch, 1), attention_mask=torch.ones((batch, ids.shape[1]), dtype=torch.long),
                                     do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_tokens,
                                     eos_token_id=end, pad_token_id=end)
            for row in out[:, ids.shape[1]:].tolist():
                tried += 1
                if end not in row:  # ran past max_tokens: no whole user turn
                    continue
                p = tok.decode(row[:row.index(end)], skip_special_tokens=True).strip()
                key = p.lower()[:80]
                if len(p.split()) < 4 or key in seen or "<|" in p:
                    continue
                seen.add(key)
                kept += 1
                f.write(json.dumps({"prompt": p, "source": "magpie", "system": system}) + "\n")
            f.flush()
            el = time.time() - t0
            log(f"magpie: {kept}/{n} prompts kept of {tried} sampled  {el / 60:.1f} min")
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="-")
    ap.add_argument("--second-round", metavar="GEN_JSONL", help="build on a first round's generations instead")
    ap.add_argument("--tokenizer", help="the target's tokenizer.json (with --second-round)")
    ap.add_argument("--magpie", metavar="HF_DIR", help="sample user turns from this instruction-tuned target "
                    "(appends to --out; resumable)")
    ap.add_argument("--batch", type=int, default=48, help="with --magpie")
    a = ap.parse_args()
    if a.magpie:
        if a.out == "-":
            ap.error("--magpie writes to a file: give --out")
        magpie(a.magpie, a.n, a.out, a.seed, a.batch, log=lambda m: print(m, file=sys.stderr, flush=True))
        return
    items = (second_round(a.second_round, a.tokenizer, a.n, a.seed) if a.second_round else
             make_prompts(a.n, a.seed))
    lines = "".join(json.dumps(p if isinstance(p, dict) else {"prompt": p}) + "\n" for p in items)
    if a.out == "-":
        print(lines, end="")
    else:
        with open(a.out, "w") as f:
            f.write(lines)


if __name__ == "__main__":
    main()
