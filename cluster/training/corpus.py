"""`specserve build-corpus`: text to train drafts on, built from what the machine holds, nothing
downloaded.

Two sources, one JSONL file (a record per document: source, kind, token ids of the target's
tokenizer, and the text):
- local text: the Python standard library's sources (code, docstrings, comments) and the
  descriptions and licences of installed packages (`*.dist-info/METADATA`, `LICENSE*`);
- the target's own answers (specserve's engine, sampled at temperature 0.8) to prompts the project
  writes (training/prompts.py: chat, code, and grounded prompts quoting local passages), kept as
  chat-templated prompt + answer, the token sequences the served target sees.
"""

from __future__ import annotations

import json
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .prompts import corpus_prompts

MAX_DOCUMENT_CHARS = 20_000  # longer files are cut into documents of this size


@dataclass
class CorpusReport:
    path: str
    documents: dict[str, int] = field(default_factory=dict)  # per source
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, source: str, tokens: int) -> None:
        self.documents[source] = self.documents.get(source, 0) + 1
        self.tokens[source] = self.tokens.get(source, 0) + tokens

    def lines(self) -> list[str]:
        out = [f"{s:<18} {self.documents[s]:>7} documents {self.tokens[s]:>10,} tokens" for s in sorted(self.tokens)]
        out.append(f"{'total':<18} {sum(self.documents.values()):>7} documents {sum(self.tokens.values()):>10,} tokens")
        return out


def _chunks(text: str) -> list[str]:
    return [text[i : i + MAX_DOCUMENT_CHARS] for i in range(0, len(text), MAX_DOCUMENT_CHARS)]


def local_documents() -> list[tuple[str, str]]:
    """(source, text) for every stdlib source file and installed package description and licence,
    in a fixed order. Files are read, never imported."""
    docs = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        docs.append(("python-stdlib", path))
    site = Path(sysconfig.get_paths()["purelib"])
    for info in sorted(site.glob("*.dist-info")):
        docs += [("package-metadata", info / "METADATA")]
        docs += [("package-licence", p) for p in sorted(info.rglob("LICEN[CS]E*")) if p.is_file()]
    out = []
    for source, path in docs:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out += [(source, chunk) for chunk in _chunks(text) if chunk.strip()]
    return out


def passages(documents: list[tuple[str, str]], n: int, seed: int = 0, chars: int = 1200) -> list[str]:
    """n prose passages (paragraph runs of a package description or a module docstring) to quote
    in grounded prompts."""
    rng = random.Random(seed)
    prose = [text for source, text in documents if source == "package-metadata"]
    prose += [text.split('"""')[1] for source, text in documents if source == "python-stdlib" and text.count('"""') >= 2]
    out = []
    for text in rng.sample(prose, min(len(prose), 4 * n)):
        body = "\n\n".join(p for p in text.split("\n\n") if p.strip() and not p.lstrip().startswith(("Metadata-", "Name:")))
        if len(body) > 300:
            start = rng.randrange(max(1, len(body) - chars))
            out.append(body[start : start + chars].strip())
        if len(out) == n:
            break
    return out


def build_corpus(engine, out_path: str, local_tokens: int, responses: int, max_new_tokens: int = 256,
                 batch: int = 32, seed: int = 0, temperature: float = 0.8, progress: bool = True) -> CorpusReport:
    """Writes the corpus: local documents in a seeded order up to local_tokens, then the target's
    answers to `responses` project prompts (batches of `batch` through the engine)."""
    tokenizer = engine.tokenizer
    report = CorpusReport(out_path)
    documents = local_documents()
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        bar = tqdm(total=local_tokens, desc="local text", unit="tok", disable=not progress, file=sys.stderr)
        for i in order:
            if sum(report.tokens.values()) >= local_tokens:
                break
            source, text = documents[i]
            ids = tokenizer.encode(text)
            f.write(json.dumps({"source": source, "kind": "text", "ids": ids, "text": text}) + "\n")
            report.add(source, len(ids))
            bar.update(len(ids))
        bar.close()
        prompts = corpus_prompts(passages(documents, max(1, responses // 3), seed), responses, seed)
        bar = tqdm(total=len(prompts), desc="target answers", unit="answer", disable=not progress, file=sys.stderr)
        for kind, ids, tokens in _answers(engine, prompts, batch, max_new_tokens, temperature, seed):
            f.write(json.dumps({"source": f"answers-{kind}", "kind": "chat", "ids": ids + tokens,
                                "prompt_tokens": len(ids), "text": tokenizer.decode(ids + tokens)}) + "\n")
            report.add(f"answers-{kind}", len(ids) + len(tokens))
            bar.update(1)
        bar.close()
    return report


def _answers(engine, prompts: list[tuple[str, str]], batch: int, max_new_tokens: int, temperature: float, seed: int):
    """(kind, prompt ids, answer ids) as answers finish, `batch` generating at once: a finished one
    makes room for the next prompt (continuous batching), so the batch never drains."""
    from specserve.cluster.runtime.requests import GenerationRequest
    from specserve.cluster.speculation import SamplingParams

    queue, running = list(enumerate(prompts)), {}
    while queue or running:
        while queue and len(running) < batch:
            i, (kind, prompt) = queue.pop(0)
            request = GenerationRequest(prompt, max_new_tokens, SamplingParams(temperature=temperature, seed=seed + i))
            ids = engine.validate(request)
            running[engine.add_request(request, ids)] = (kind, ids)
        for out in engine.step():
            if out.result is not None:
                kind, ids = running.pop(out.seq_id)
                engine.abort(out.seq_id)  # frees its caches now
                yield kind, ids, out.result.token_ids


def read_corpus(path: str) -> list[dict]:
    """The records of a corpus file; a clear error names a bad line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                if not isinstance(record.get("ids"), list) or not all(isinstance(t, int) for t in record["ids"]):
                    raise ValueError("'ids' must be a list of token ids")
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a corpus record: {e}") from None
            out.append(record)
    return out
