"""Chat templates rendered as transformers renders them, KV-cache reuse across chat turns,
and the chat flags of scripts/generate.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from dynaexq_jax import launch
from dynaexq_jax.cli import generate
from dynaexq_jax.io import chat, loader
from dynaexq_jax.runtime import engine

ROOT = Path(__file__).resolve().parent.parent

# Qwen3's chat template as published with its checkpoints (Qwen/Qwen3-30B-A3B tokenizer_config.json).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (verbatim)

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def write_chat_tokenizer(path: Path, vocab: int = 300) -> None:
    """A byte-level BPE like Qwen3's, with its chat control tokens as added tokens: `vocab` ids in all."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(CHAT_TOKENS[3:]), special_tokens=CHAT_TOKENS[:3],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "the quick brown fox", "user assistant system"] * 20,
                            trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAT_TOKENS[3:]])  # not special in Qwen3
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": QWEN3_TEMPLATE,
    }))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, moe_checkpoint):
    """The tiny test model with a Qwen3 tokenizer and chat template."""
    path = tmp_path_factory.mktemp("hf-moe-chat")
    for f in moe_checkpoint[0].iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    write_chat_tokenizer(path)
    return path


CONVERSATIONS = {
    "user": [{"role": "user", "content": "def f(x):"}],
    "system+user": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "the fox"}],
    "multi-turn with thinking": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nhello"},
        {"role": "user", "content": "and the fox?"},
    ],
}


@pytest.mark.parametrize("thinking", [None, True, False], ids=["thinking-default", "thinking-on", "thinking-off"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_equals_transformers_apply_chat_template(chat_checkpoint, name, thinking):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chat_checkpoint)
    ours = chat.load_chat_template(chat_checkpoint)
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    messages = CONVERSATIONS[name]
    for gen_prompt in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt, **kwargs)
        assert ours.render(messages, add_generation_prompt=gen_prompt, **kwargs) == expected
    if thinking is False:
        assert expected.endswith("<|im_end|>\n") and ours.render(messages, **kwargs).endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        )
    tok = loader.load_tokenizer(chat_checkpoint)
    text = ours.render(messages, **kwargs)
    ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs)
    assert tok.encode(text, add_special_tokens=False).ids == list(ids)


def test_special_tokens_helpers_and_jinja_file(tmp_path):
    from transformers import PreTrainedTokenizerFast

    write_chat_tokenizer(tmp_path)
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
        "{{ m | tojson }}{{ eos_token }}\n{% endfor %}"
    )
    (tmp_path / "chat_template.jinja").write_text(source)  # wins over tokenizer_config.json's template
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=source,
                                  bos_token="<|endoftext|>", eos_token="<|im_end|>")
    ours = chat.ChatTemplate(source, {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    messages = [{"role": "user", "content": "<a> & \"b\" é"}]
    assert ours.render(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (chat.load_chat_template(tmp_path).render(messages)
            == '{"role": "user", "content": "<a> & \\"b\\" é"}<|im_end|>\n')
    with pytest.raises(chat.ChatTemplateError, match="roles must be user or assistant"):
        ours.render([{"role": "tool", "content": "x"}])


def test_no_template_is_none(moe_checkpoint):
    assert chat.load_chat_template(moe_checkpoint[0]) is None


@pytest.fixture(scope="module")
def chat_engine(chat_checkpoint):
    ckpt = loader.load(chat_checkpoint, jnp.float32)
    return engine.Engine(ckpt), ckpt.tokenizer


def test_chat_turns_reuse_the_cache_and_equal_a_fresh_generate(chat_engine):
    eng, _ = chat_engine
    # Token counts are chosen so every new stretch is one 16-token chunk and the session's
    # cache is as long as generate's: the steps compile once and are shared (CPU compiles are slow).
    session = eng.new_session(128, max_chunk=16)
    first = list(range(3, 19))
    turn1 = eng.chat_turn(session, first, 6, eos_token_ids=())
    assert turn1.tokens == eng.generate([first], 6, eos_token_ids=()).tokens
    assert turn1.stats["reused_tokens"] == 0 and turn1.stats["prompt_tokens"] == 16

    second = first + turn1.tokens[0] + list(range(40, 55))
    turn2 = eng.chat_turn(session, second, 5, eos_token_ids=())
    assert turn2.stats["reused_tokens"] == len(first) + 5  # the last reply token was never fed
    assert turn2.stats["prompt_tokens"] == 16
    assert turn2.tokens == eng.generate([second], 5, eos_token_ids=()).tokens

    # A conversation that parts from the cache (a template rewriting history) rewinds it.
    third = first[:8] + list(range(60, 76))
    turn3 = eng.chat_turn(session, third, 4, eos_token_ids=())
    assert turn3.stats["reused_tokens"] == 8
    assert turn3.tokens == eng.generate([third], 4, eos_token_ids=()).tokens


def test_chat_turn_refuses_a_conversation_longer_than_the_session(chat_engine):
    eng, _ = chat_engine
    session = eng.new_session(128, max_chunk=64)
    with pytest.raises(engine.ContextError, match="--context"):
        eng.chat_turn(session, [5] * 120, 16)


def run_cli(capsys, *argv):
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_is_the_default_with_a_template_and_renders_system_and_thinking(capsys, chat_checkpoint, chat_engine):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chat_checkpoint)
    eng, _ = chat_engine
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f"}]
    code, out, _ = run_cli(capsys, "--model", str(chat_checkpoint), "--prompt", "def f", "--system", "Be brief.",
                           "--no-thinking", "--max-new-tokens", "4", "--dtype", "float32", "--policy", "full", "--json")
    assert code == 0
    ids = ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, enable_thinking=False)
    stop = (0, ref.convert_tokens_to_ids("<|im_end|>"))  # generation_config's EOS and the template's
    assert json.loads(out)["outputs"][0]["token_ids"] == eng.generate([list(ids)], 4, eos_token_ids=stop).tokens[0]
    no_chat = launch.Prompter(launch.PromptOptions(chat=False), chat_checkpoint, loader.load_tokenizer(chat_checkpoint))
    assert no_chat.encode("def f") == ref("def f")["input_ids"]


@pytest.mark.parametrize(
    "extra, needle",
    [(["--chat"], "no chat template"), (["--system", "x"], "need a chat template"),
     (["--no-chat", "--thinking"], "need the chat template")],
)
def test_chat_flags_without_a_template_are_one_line_errors(capsys, moe_checkpoint, extra, needle):
    code, out, err = run_cli(capsys, "--model", str(moe_checkpoint[0]), "--max-new-tokens", "2", *extra)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_interactive_keeps_the_conversation_and_its_cache(capsys, chat_checkpoint, chat_engine):
    eng, tok = chat_engine
    args = generate.parse_args(["--model", str(chat_checkpoint), "--interactive", "--max-new-tokens", "5",
                                "--dtype", "float32", "--policy", "full", "--context", "256", "--system", "Hi."])
    turns = generate.interactive(launch.EngineOptions.from_args(args), None, stdin=io.StringIO("def f\n\nthe fox\n"))
    out, err = capsys.readouterr()
    assert len(turns) == 2 and err.count("\n") == 2 and "reused" in err
    assert turns[1]["reused_tokens"] > turns[0]["prompt_tokens"] // 2
    # The second reply is what a fresh run on the whole rendered conversation gives.
    template = chat.load_chat_template(chat_checkpoint)
    stop = (0, tok.token_to_id("<|im_end|>"))
    history = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "def f"}]
    first = tok.encode(template.render(history), add_special_tokens=False).ids
    reply = eng.generate([first], 5, eos_token_ids=stop).tokens[0]
    history += [{"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)},
                {"role": "user", "content": "the fox"}]
    second = tok.encode(template.render(history), add_special_tokens=False).ids
    expected = eng.generate([second], 5, eos_token_ids=stop).tokens[0]
    texts = [tok.decode(t, skip_special_tokens=True) for t in (reply, expected)]
    assert out == f"{texts[0]}\n{texts[1]}\n"
