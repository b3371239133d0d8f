"""Chat data for fine-tuning: records to conversations, chat templates, answer-only labels,
and a packed row that gives each conversation the loss it has alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS

from llmkit.core.prepared import IGNORE_INDEX
from llmkit.data.pack import SFTPacker
from llmkit.data.sft import (
    CHATML,
    answer_spans,
    conversation_from_record,
    conversation_text,
    detect_chat_format,
    end_of_turn_token,
    ensure_chat_template,
    map_contents,
    packed_attention_mask,
    render_batch_with_labels,
    render_with_labels,
    tokenize_with_labels,
)
from llmkit.errors import UserError

SUPPORT = Path(__file__).resolve().parents[1] / "examples" / "support"
GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
X = IGNORE_INDEX

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def _support_conversations() -> list[list[dict[str, str]]]:
    lines = (SUPPORT / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    return [
        conversation_from_record(json.loads(line), where=f"conversations.jsonl:{n}")
        for n, line in enumerate(lines, 1)
    ]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture()
def words_tokenizer():
    """A word-level tokenizer, one id per word, "\\n" and " " their own tokens; ChatML markers
    are special; no chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "\n", " ", "system", "user", "assistant"]
    words += ["Be", "brief.", "Hi", "Hello!", "Bye", "See", "you."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| "), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens=["<|im_start|>"],
    )


@pytest.fixture(scope="module")
def support_texts() -> list[str]:
    return [m["content"] for c in _support_conversations() for m in c]


@pytest.fixture()
def bpe_tokenizer(support_texts):
    """A byte-level BPE trained by llmkit on the support set, ChatML markers in its vocabulary."""
    from llmkit.core.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(
        iter(support_texts), vocab_size=400, extra_special_tokens=CHATML.special_tokens
    )


# --------------------------------------------------------------------------- records
def test_the_three_record_formats():
    msgs = conversation_from_record({"id": 7, "messages": TWO_TURNS}, where="f:1")
    assert msgs == TWO_TURNS and msgs is not TWO_TURNS
    extra = [{**m, "name": "x"} for m in TWO_TURNS]
    assert conversation_from_record({"messages": extra}, where="f:1") == TWO_TURNS
    assert conversation_from_record({"prompt": "Q?", "response": "A."}, where="f:2") == [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    assert conversation_from_record(
        {"system": "S.", "prompt": "Q?", "completion": "A."}, where="f:3"
    ) == [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    alpaca = {"instruction": "Translate.", "input": "Hallo", "output": "Hello"}
    assert conversation_from_record(alpaca, where="f:4") == [
        {"role": "user", "content": "Translate.\n\nHallo"},
        {"role": "assistant", "content": "Hello"},
    ]
    for empty in ({"input": ""}, {"input": None}, {}):
        record = {"instruction": "Say hi.", "output": "Hi", **empty}
        assert conversation_from_record(record, where="f:5")[0] == {
            "role": "user",
            "content": "Say hi.",
        }
    assert [detect_chat_format(r) for r in ({"messages": []}, {"prompt": 1}, alpaca, {}, [])] == [
        "messages",
        "prompt-response",
        "alpaca",
        None,
        None,
    ]


USER, ASSISTANT = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
ASSISTANT_YES = {"role": "assistant", "content": "Yes"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "expected a JSON object, found list"),
        ({"text": "plain"}, "not a chat record (fields: text)"),
        ({"messages": "hi"}, "field 'messages' is str, not a list"),
        ({"messages": []}, "field 'messages' is empty"),
        ({"messages": [USER, "A"]}, "message 1 is str, not an object"),
        ({"messages": [USER, {"content": "A"}]}, "message 1 has no 'role'"),
        ({"messages": [{"role": "bot", "content": "A"}]}, "message 0 has role 'bot'"),
        ({"messages": [USER, {"role": "assistant"}]}, "message 1 (assistant) has no 'content'"),
        (
            {"messages": [USER, {"role": "assistant", "content": ["A"]}]},
            "message 1 (assistant) has content list, not a string",
        ),
        ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, "1 (assistant) is empty"),
        (
            {"messages": [USER, ASSISTANT, {"role": "system", "content": "S"}]},
            "message 2 is a system message after the first message",
        ),
        ({"messages": [ASSISTANT, USER]}, "does not start with a user message"),
        ({"messages": [{"role": "system", "content": "S"}]}, "does not start with a user message"),
        ({"messages": [USER]}, "no assistant message"),
        ({"prompt": "Q"}, "no field 'response' (fields: prompt)"),
        ({"prompt": "Q", "response": 3}, "field 'response' is int, not a string"),
        ({"prompt": "", "response": "A"}, "field 'prompt' is empty"),
        ({"instruction": "Do.", "input": "x"}, "no field 'output' (fields: input, instruction)"),
        ({"instruction": "Do.", "input": 5, "output": "A"}, "field 'input' is int"),
    ],
)
def test_bad_records_name_the_line_and_the_problem(record, message):
    with pytest.raises(UserError) as err:
        conversation_from_record(record, where="data/chat.jsonl:12")
    assert err.value.message.startswith("data/chat.jsonl:12: ")
    assert message in err.value.message
    assert "\n" not in err.value.message


def test_conversation_text_and_map_contents():
    conv = TWO_TURNS[1:3]
    assert conversation_text(conv) == "user: Hi\n\nassistant: Hello!"
    assert map_contents(conv, str.upper) == [
        {"role": "user", "content": "HI"},
        {"role": "assistant", "content": "HELLO!"},
    ]
    assert conv[0]["content"] == "Hi"  # not modified in place


# --------------------------------------------------------------------------- templates
def test_chatml_installed_without_new_tokens_when_present(words_tokenizer):
    n = len(words_tokenizer)
    assert ensure_chat_template(words_tokenizer) == "chatml"
    assert len(words_tokenizer) == n
    assert words_tokenizer.chat_template == CHATML.template
    assert words_tokenizer.apply_chat_template(TWO_TURNS[1:3], tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert words_tokenizer.apply_chat_template(
        TWO_TURNS[1:2], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # now it has a template of its own: kept
    assert ensure_chat_template(words_tokenizer) == "tokenizer"
    assert ensure_chat_template(words_tokenizer, "tokenizer") == "tokenizer"


def test_chatml_tokens_added_to_a_plain_llmkit_tokenizer(support_texts, tmp_path):
    from llmkit.core.tokenizer import load_tokenizer, token_byte_lengths, train_bpe_tokenizer

    tok = train_bpe_tokenizer(iter(support_texts), vocab_size=300)
    assert len(tok) == 300
    assert ensure_chat_template(tok, "auto") == "chatml"
    assert len(tok) == 302  # the vocabulary grew: a pretrained model must be resized
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (300, 301)
    ids = tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)
    assert (ids[0], ids[-1]) == (300, 301) and 300 not in ids[1:-1] and 301 not in ids[1:-1]
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.chat_template == CHATML.template
    assert again.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [300, 301]
    assert token_byte_lengths(again)[[300, 301]].tolist() == [0, 0]
    assert end_of_turn_token(again) == "<|im_end|>"


def test_markers_held_as_plain_vocabulary_become_special_without_growth():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "Hi", "Yes"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert "<|im_end|>" not in tok.all_special_tokens
    assert ensure_chat_template(tok) == "chatml"
    assert len(tok) == 8 and {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    ids, labels = render_with_labels(tok, [{"role": "user", "content": "Hi"}, ASSISTANT_YES])
    assert ids == [1, 4, 3, 6, 2, 3, 1, 5, 3, 7, 2, 3]
    assert labels == [X] * 9 + [7, 2, X]


def test_own_template_kept_unless_a_name_is_given(words_tokenizer):
    own = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    words_tokenizer.chat_template = own
    assert ensure_chat_template(words_tokenizer) == "tokenizer"
    assert words_tokenizer.chat_template == own
    assert ensure_chat_template(words_tokenizer, "chatml") == "chatml"
    assert words_tokenizer.chat_template == CHATML.template


def test_template_name_errors(words_tokenizer):
    with pytest.raises(UserError, match="unknown chat template 'vicuna'.*chatml"):
        ensure_chat_template(words_tokenizer, "vicuna")
    with pytest.raises(UserError, match="no chat template of its own"):
        ensure_chat_template(words_tokenizer, "tokenizer")
    with pytest.raises(UserError, match="no chat template"):
        render_with_labels(words_tokenizer, TWO_TURNS)


# --------------------------------------------------------------------------- labels
def test_two_turn_chatml_mask_is_exact(words_tokenizer):
    """The issue's test: -100 on system and user tokens and role markers; the token ids on the
    answers and their <|im_end|>; not on the newline after <|im_end|>."""
    ensure_chat_template(words_tokenizer)
    ids, labels = render_with_labels(words_tokenizer, TWO_TURNS)
    # <|im_start|>=1 <|im_end|>=2 \n=3 " "=4 system=5 user=6 assistant=7 Be=8 brief.=9 Hi=10
    # Hello!=11 Bye=12 See=13 you.=14
    assert ids == [
        *[1, 5, 3, 8, 4, 9, 2, 3],  # <|im_start|>system\nBe brief.<|im_end|>\n
        *[1, 6, 3, 10, 2, 3],  # <|im_start|>user\nHi<|im_end|>\n
        *[1, 7, 3, 11, 2, 3],  # <|im_start|>assistant\nHello!<|im_end|>\n
        *[1, 6, 3, 12, 2, 3],  # <|im_start|>user\nBye<|im_end|>\n
        *[1, 7, 3, 13, 4, 14, 2, 3],  # <|im_start|>assistant\nSee you.<|im_end|>\n
    ]
    assert labels == [
        *[X] * 8,
        *[X] * 6,
        *[X, X, X, 11, 2, X],
        *[X] * 6,
        *[X, X, X, 13, 4, 14, 2, X],
    ]
    assert ids == words_tokenizer.apply_chat_template(TWO_TURNS, tokenize=True)["input_ids"]
    ids_all, labels_all = render_with_labels(words_tokenizer, TWO_TURNS, train_on="all")
    assert ids_all == ids and labels_all == ids


def test_llmkit_bpe_answers_decode_to_the_answers(bpe_tokenizer):
    ensure_chat_template(bpe_tokenizer)
    ids, labels = render_with_labels(bpe_tokenizer, TWO_TURNS)
    assert ids == bpe_tokenizer.apply_chat_template(TWO_TURNS, tokenize=True)["input_ids"]
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != X]
    assert bpe_tokenizer.decode(trained) == "Hello!<|im_end|>See you.<|im_end|>"
    assert all(lab in (X, i) for i, lab in zip(ids, labels, strict=True))
    # every other token together is the prompt side, unchanged
    rest = [i if lab == X else None for i, lab in zip(ids, labels, strict=True)]
    assert bpe_tokenizer.decode([i for i in rest if i is not None]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n\n"
    )


LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim)"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def test_template_with_bos_gives_one_bos(support_texts):
    """A Llama-3-style template writes BOS itself; the tokenizer also adds BOS by default:
    one BOS only, as apply_chat_template tokenizes."""
    from tokenizers import processors

    from llmkit.core.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(iter(support_texts), 400, extra_special_tokens=LLAMA3_TOKENS)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.bos_token = "<|begin_of_text|>"
    assert tok("Hi")["input_ids"][0] == bos  # the tokenizer adds a BOS of its own
    tok.chat_template = LLAMA3_LIKE
    messages = [*TWO_TURNS[:2], {"role": "assistant", "content": " Hello! \n"}, *TWO_TURNS[3:]]
    ids, labels = render_with_labels(tok, messages)
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != X]
    assert tok.decode(trained) == "Hello!<|eot_id|>See you.<|eot_id|>"
    assert end_of_turn_token(tok) == "<|eot_id|>"


def test_token_straddling_the_answer_start_is_trained(bpe_tokenizer):
    """A plain-text template where the answer's first word merges with the space before it."""
    bpe_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
        "{% else %}Answer:{{ ' ' + m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer:{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Orders"}]
    text, spans = answer_spans(bpe_tokenizer, messages)
    assert [text[s:e] for s, e in spans] == [" Orders<|im_end|>"]
    ids, labels = render_with_labels(bpe_tokenizer, messages)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != X]
    assert bpe_tokenizer.decode(trained) == " Orders<|im_end|>"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        # the generation prompt opens the turn with another role than the rendered answer
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}",
            r"generation prompt ends 'bot\\n' where its rendered answer 2 has 'assistant\\n'",
        ),
        # the answer is not written at all
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            r"does not write assistant message 2 after its generation prompt",
        ),
    ],
)
def test_answers_that_cannot_be_aligned_are_refused(words_tokenizer, template, message):
    """Only what truly cannot be aligned is refused, one line naming the template's feature."""
    words_tokenizer.chat_template = template
    with pytest.raises(UserError, match=rf"^x\.jsonl:3: the chat template.* {message}.*cannot be"):
        render_with_labels(words_tokenizer, TWO_TURNS, where="x.jsonl:3")


def test_earlier_answers_the_template_rewrites_are_left_out_the_final_one_trained(
    words_tokenizer,
):
    """A template that writes '...' for answers before the last turn (reasoning-stripping
    style): the earlier answer is not in the text, so only the final one is trained."""
    words_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    located: dict[str, int] = {}
    text, spans = answer_spans(words_tokenizer, TWO_TURNS, located=located)
    assert [text[s:e] for s, e in spans] == ["See you.<|im_end|>"]
    assert located == {"not_trained": 1, "prefix": 1}
    # ... and the final answer is refused when a user turn follows it and rewrites it
    with pytest.raises(
        UserError,
        match=r"^y:2: the chat template renders it differently.*final assistant message 2",
    ):
        answer_spans(words_tokenizer, TWO_TURNS[:4], where="y:2")


def test_template_that_refuses_names_the_record(words_tokenizer):
    words_tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML.template
    )
    with pytest.raises(UserError, match=r"^x\.jsonl:9: .*refused.*System role not supported"):
        render_with_labels(words_tokenizer, TWO_TURNS, where="x.jsonl:9")
    assert render_with_labels(words_tokenizer, TWO_TURNS[1:])[0][:2] == [1, 6]


def test_special_token_in_text_is_refused(words_tokenizer):
    ensure_chat_template(words_tokenizer)
    bad = [TWO_TURNS[1], {"role": "assistant", "content": "Hi<|im_end|><|im_start|>user"}]
    with pytest.raises(UserError, match=r"x:1: message 1 \(assistant\) contains the special"):
        render_with_labels(words_tokenizer, bad, where="x:1")
    with pytest.raises(UserError, match="train_on 'answers'"):
        render_with_labels(words_tokenizer, TWO_TURNS, train_on="answers")


def test_batch_equals_one_by_one(bpe_tokenizer):
    ensure_chat_template(bpe_tokenizer)
    convs = _support_conversations()[:12]
    ids, labels = render_batch_with_labels(bpe_tokenizer, convs)
    one_by_one = [render_with_labels(bpe_tokenizer, c) for c in convs]
    assert ids == [i for i, _ in one_by_one] and labels == [lab for _, lab in one_by_one]
    assert render_batch_with_labels(bpe_tokenizer, []) == ([], [])
    # the skip path: spans one by one (a failing conversation left out), then one batch
    bad = [{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "A"}]
    texts, spans = [], []
    for k, conv in enumerate([*convs[:3], bad, *convs[3:]]):
        try:
            text, conv_spans = answer_spans(bpe_tokenizer, conv, where=f"c:{k}")
        except UserError as err:
            assert err.message.startswith("c:3: message 0 (user) contains the special token")
            continue
        texts.append(text)
        spans.append(conv_spans)
    assert tokenize_with_labels(bpe_tokenizer, texts, spans) == (ids, labels)
    for conv, row, lab in zip(convs, ids, labels, strict=True):
        answers = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        trained = [i for i, x in zip(row, lab, strict=True) if x != X]
        assert bpe_tokenizer.decode(trained) == "".join(answers)


# --------------------------------------------------------------------------- the example data
def test_support_examples_are_valid_chat_data():
    convs = _support_conversations()
    assert len(convs) == 81
    assert sum(c[0]["role"] == "system" for c in convs) == 27
    assert sum(sum(m["role"] == "assistant" for m in c) == 2 for c in convs) == 15
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert max(len(a) for a in answers) < 200
    assert len({conversation_text(c) for c in convs}) == 81  # no duplicate conversation
    lines = (SUPPORT / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 10 and {detect_chat_format(r) for r in records} == {"alpaca"}
    alpaca = [conversation_from_record(r, where=f"alpaca:{n}") for n, r in enumerate(records, 1)]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in alpaca)


# --------------------------------------------------------------------------- packed rows
def test_packed_attention_mask_is_block_diagonal_causal():
    import torch

    pos = torch.tensor([[0, 1, 0, 1, 2]])
    allowed = packed_attention_mask(pos)
    assert allowed.shape == (1, 1, 5, 5) and allowed.dtype == torch.bool
    assert allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    additive = packed_attention_mask(pos, dtype=torch.float32)
    assert additive[0, 0, 3].tolist() == [torch.finfo(torch.float32).min] * 2 + [0.0, 0.0] + [
        torch.finfo(torch.float32).min
    ]


def _tiny_model(kind: str, attn: str, vocab_size: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512)
        model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation(attn)
    return model.float().eval()


@pytest.fixture(scope="module")
def packed_pair(support_texts):
    """Two short support conversations, rendered with ChatML, and one packed row of them."""
    from llmkit.core.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(iter(support_texts), 400, extra_special_tokens=CHATML.special_tokens)
    ensure_chat_template(tok)
    convs = _support_conversations()
    pair = [convs[1], convs[0]]  # one exchange; then system + two turns
    rendered = [render_with_labels(tok, c) for c in pair]
    lengths = [len(ids) for ids, _ in rendered]
    block = sum(lengths) + 5  # room for both, and 5 padding tokens
    packer = SFTPacker(block, pad_token_id=tok.pad_token_id)
    assert packer.add(rendered)["input_ids"].shape == (0, block)
    row = packer.flush()
    assert packer.stats()["rows"] == 1 and packer.pad_tokens == 5
    return tok, rendered, row, packer


def _summed_loss(model, batch: dict, **kwargs):
    """Summed next-token cross-entropy over labels != -100 (nats) and the number of targets:
    inputs ids[:, :-1], targets labels[:, 1:] (labels[t] is the target of position t-1, the
    shift of llmkit.core.scoring.split_batch)."""
    import torch
    import torch.nn.functional as F

    ids, labels = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["labels"])
    targets = labels[:, 1:].long()
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1].long(), **kwargs).logits  # (B, T-1, vocab_size)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return float(loss), int((targets != X).sum())


def _loss_alone(model, ids, labels):
    return _summed_loss(model, {"input_ids": [ids], "labels": [labels]})


def _loss_packed(model, row, how: str):
    import torch

    position_ids = torch.as_tensor(row["position_ids"])[:, :-1].long()  # sliced like input_ids
    kwargs = {"position_ids": position_ids}
    if how == "position_ids":
        kwargs["use_cache"] = False
    elif how == "4d_mask":
        dtype = None if model.config._attn_implementation == "sdpa" else model.dtype
        kwargs["attention_mask"] = packed_attention_mask(position_ids, dtype=dtype)
    return _summed_loss(model, row, **kwargs)


@pytest.mark.parametrize("how", ["position_ids", "4d_mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_loss_equals_the_conversations_alone(packed_pair, kind, attn, how):
    """The issue's test: the loss over one packed row of two conversations is the sum of each
    conversation's summed loss alone divided by the total answer tokens."""
    tok, rendered, row, packer = packed_pair
    model = _tiny_model(kind, attn, len(tok))
    alone = [_loss_alone(model, ids, labels) for ids, labels in rendered]
    total = sum(n for _, n in alone)
    assert total == packer.answer_tokens > 20
    packed, n_packed = _loss_packed(model, row, how)
    assert n_packed == total
    expected = sum(loss for loss, _ in alone) / total
    assert packed / n_packed == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # a micro-batch of two rows, the conversations in the other order in the second one
    other = SFTPacker(row["input_ids"].shape[1], pad_token_id=tok.pad_token_id)
    other.add(rendered[::-1])
    swapped = other.flush()
    assert swapped["position_ids"][0].tolist() != row["position_ids"][0].tolist()
    batch = {k: np.concatenate([row[k], swapped[k]]) for k in row}
    packed2, n_packed2 = _loss_packed(model, batch, how)
    assert n_packed2 == 2 * total
    assert packed2 / n_packed2 == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_position_ids_alone_leak_across_conversations_without_use_cache_false(packed_pair, kind):
    """Why the training loop must pass use_cache=False: with the config default
    (use_cache=True) the model makes a cache and transformers 5.24 skips packed-sequence
    detection, so the second conversation attends to the first. If this starts failing,
    transformers changed that rule; the use_cache=False path stays right either way."""
    import torch

    tok, rendered, row, _ = packed_pair
    model = _tiny_model(kind, "sdpa", len(tok))
    assert model.config.use_cache is True
    n_first = len(rendered[0][0])
    second = torch.tensor([rendered[1][0]])
    ids = torch.as_tensor(row["input_ids"]).long()
    pos = torch.as_tensor(row["position_ids"]).long()
    with torch.no_grad():
        alone = model(input_ids=second).logits[0]  # (T2, vocab_size)
        right = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        leaky = model(input_ids=ids, position_ids=pos).logits[0]
    part = slice(n_first, n_first + second.shape[1])
    assert (right[part] - alone).abs().max() < 1e-4
    assert (leaky[part] - alone).abs().max() > 1e-2


# --------------------------------------------------------------------------- the real template
@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent")
def test_smollm2_template_labels_the_answers_only():
    """SmolLM2-135M-Instruct's own tokenizer and ChatML template (it inserts a default system
    prompt when there is none). Slow: reading the GGUF's vocabulary takes about 20 s here."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    assert ensure_chat_template(tok) == "tokenizer"
    assert end_of_turn_token(tok) == "<|im_end|>"
    for messages in (TWO_TURNS, TWO_TURNS[1:], _support_conversations()[0]):
        ids, labels = render_with_labels(tok, messages)
        assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == len(messages) + (
            messages[0]["role"] != "system"
        )
        trained = [i for i, lab in zip(ids, labels, strict=True) if lab != X]
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert tok.decode(trained) == "".join(answers)
        prompt_side = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == X])
        assert "SmolLM" in prompt_side or messages[0]["role"] == "system"
