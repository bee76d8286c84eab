"""Chats (a list of messages) through the engine: the model's chat template applied, the same
answer as the templated prompt; without a template the error names `messages`."""

import pytest

from specserve.cluster.runtime.engine import ChatMessage, GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.tokenizer import HFTokenizer
from specserve.cluster.speculation import InvalidRequest

pytestmark = pytest.mark.usefixtures("one_thread")
CHAT = (ChatMessage("system", "You answer briefly."), ChatMessage("user", "Name three fruits."),
        ChatMessage("assistant", "Apples, pears, plums."), ChatMessage("user", "Three more?"))


def test_a_chat_is_its_templated_prompt(tiny_llama):
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, None, num_draft_tokens=0)
    templated = "".join(f"<|{m.role}|>\n{m.content}\n" for m in CHAT) + "<|assistant|>\n"
    chat, prompt = engine.generate([GenerationRequest("", 12, messages=CHAT), GenerationRequest(templated, 12)])
    assert chat.token_ids == prompt.token_ids and chat.prompt_tokens == len(templated.encode())


@pytest.mark.smollm2
def test_smollm2_chats_through_its_own_template(smollm2_fp32):
    from specserve.cluster.runtime.drafters import NgramDrafter

    tok = smollm2_fp32.tokenizer
    engine = SpeculativeEngine(smollm2_fp32.model, tok, NgramDrafter(), num_draft_tokens=3, chat_template=True)
    want = tok._tok.apply_chat_template([{"role": m.role, "content": m.content} for m in CHAT], tokenize=False,
                                        add_generation_prompt=True)
    assert "You answer briefly." in want and want.rstrip().endswith("assistant")
    chat, ids = engine.generate([GenerationRequest("", 16, messages=CHAT),
                                 GenerationRequest("", 16, prompt_ids=tuple(tok.encode(want)), num_draft_tokens=0)])
    assert chat.token_ids == ids.token_ids and chat.text.strip()
    one = engine.generate([GenerationRequest("", 8, messages=(ChatMessage("user", "Hi"),)), GenerationRequest("Hi", 8)])
    assert one[0].token_ids == one[1].token_ids  # a prompt is a one-message chat when chat_template is on


def test_a_model_without_a_chat_template_refuses_messages(tiny_llama):
    tok = HFTokenizer.__new__(HFTokenizer)
    tok.has_chat_template = False
    with pytest.raises(InvalidRequest) as e:
        tok.encode_messages([{"role": "user", "content": "hi"}])
    assert e.value.field == "messages"
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, None)
    for bad, field in ((GenerationRequest("", 4, messages=()), "messages"),
                       (GenerationRequest("", 4, messages=(ChatMessage("bot", "x"),)), "messages[0].role"),
                       (GenerationRequest("hi", 4, messages=(ChatMessage("user", "x"),)), "messages"),
                       (GenerationRequest("", 4, messages=(ChatMessage("user", "x" * 5000),)), "messages")):
        with pytest.raises(InvalidRequest) as e:
            engine.generate([bad])
        assert e.value.field == field
