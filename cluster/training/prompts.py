"""The prompts whose answers the target writes into the training corpus: chat, code and grounded.

Written for the corpus only (never the bench's prompts): templates crossed with subjects, and
grounded prompts that quote a passage of local text. Deterministic for a seed.
"""

from __future__ import annotations

import random

CHAT_TEMPLATES = (
    "Explain {} to a curious teenager.",
    "What are the main ideas behind {}?",
    "Write a short blog post about {}.",
    "Give me three practical tips related to {}.",
    "What are common misconceptions about {}?",
    "Describe the history of {} in a few paragraphs.",
    "Compare {} with a related idea and explain the differences.",
    "Write a friendly email inviting a colleague to a talk on {}.",
    "I am new to {}. Where should I start?",
    "Summarize the pros and cons of {}.",
    "Write a short story in which {} plays a central role.",
    "How would you teach {} to a group of adults?",
    "What questions should I ask an expert in {}?",
    "Write a haiku and a limerick about {}.",
    "Why does {} matter in everyday life?",
)

CHAT_SUBJECTS = (
    "photosynthesis", "compound interest", "the water cycle", "plate tectonics", "vaccines", "black holes",
    "the French Revolution", "supply and demand", "machine learning", "climate change", "sleep hygiene",
    "public speaking", "time management", "the immune system", "renewable energy", "the Roman Empire",
    "inflation", "gardening in small spaces", "learning a second language", "the theory of evolution",
    "budgeting for students", "the printing press", "ocean currents", "healthy cooking", "volcanoes",
    "meditation", "electric cars", "the stock market", "bird migration", "the scientific method",
    "jazz music", "urban planning", "recycling", "remote work", "the human brain", "chess strategy",
    "marathon training", "the moon landing", "coffee brewing", "honey bees", "democracy", "earthquakes",
    "writing a resume", "negotiation", "quantum computing", "the Renaissance", "antibiotics", "rainforests",
    "first aid", "photography", "the internet", "nutrition labels", "mountain hiking", "classical music",
    "the solar system", "credit scores", "composting", "team leadership", "ancient Egypt", "wind power",
)

CODE_TEMPLATES = (
    "Write a Python function that {}.",
    "Write a Python function that {}. Include a docstring and type hints.",
    "Show how to {} in Python, and explain the code.",
    "Write a small Python class that can {}.",
    "Write a JavaScript function that {}.",
    "How would you {} efficiently? Answer with code.",
    "Write unit tests with pytest for a function that {}.",
    "Write a shell command or script to {}.",
)

CODE_TASKS = (
    "reverses the words in a sentence", "checks whether a string is a palindrome",
    "merges two sorted lists", "counts the frequency of words in a text file", "computes the nth Fibonacci number",
    "parses a CSV file into a list of dictionaries", "finds the largest element in a nested list",
    "removes duplicates from a list while keeping order", "validates an email address", "flattens a nested dictionary",
    "converts Celsius to Fahrenheit", "reads a JSON file and prints its keys", "implements binary search",
    "computes the median of a list of numbers", "groups a list of records by a key", "rotates a matrix by 90 degrees",
    "retries a function call with exponential backoff", "downloads a file with a progress bar",
    "implements a least-recently-used cache", "splits a list into chunks of a given size",
    "finds all prime numbers below a limit", "formats a number of bytes as a human-readable size",
    "tokenizes an arithmetic expression", "checks whether parentheses are balanced", "computes a moving average",
    "sorts a list of dictionaries by two keys", "walks a directory tree and lists large files",
    "implements a simple stack and queue", "computes the edit distance between two strings",
    "measures how long a function takes to run", "builds a word histogram", "transposes a list of lists",
    "finds anagrams in a list of words", "converts a Roman numeral to an integer", "schedules tasks by priority",
    "serializes a dataclass to JSON", "parses command-line arguments", "computes the greatest common divisor",
    "counts lines of code in a project", "implements depth-first search on a graph",
)

GROUNDED_TEMPLATES = (
    "Summarize the following text in a few sentences.\n\n{}",
    "Explain what the following documentation describes, for a beginner.\n\n{}",
    "List the key points of this text.\n\n{}",
    "Read the text below and answer: what is it for, and how is it used?\n\n{}",
    "Rewrite the following passage in plain language.\n\n{}",
    "Write three questions a reader might ask about this text, with answers.\n\n{}",
)


def corpus_prompts(passages: list[str], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (category, prompt) pairs in equal shares of chat, code and grounded (passages quoted)."""
    rng = random.Random(seed)
    pools = {
        "chat": [t.format(s) for t in CHAT_TEMPLATES for s in CHAT_SUBJECTS],
        "code": [t.format(s) for t in CODE_TEMPLATES for s in CODE_TASKS],
    }
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for i in range(n):
        kind = ("chat", "code", "grounded")[i % 3]
        if kind == "grounded" and passages:
            out.append((kind, rng.choice(GROUNDED_TEMPLATES).format(rng.choice(passages))))
        else:
            kind = "chat" if kind == "grounded" else kind
            pool = pools[kind]
            out.append((kind, pool[(i // 3) % len(pool)]))
    return out
