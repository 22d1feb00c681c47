"""Chat templates: the tokenizer's own, or a built-in one chosen by name.

Every template is a Jinja string rendered through the tokenizer's `apply_chat_template`, so a
built-in template and a model's own template go through exactly the same code path.

Built-in templates must be *incremental*: rendering the first k messages (with the generation
prompt when the next message is the assistant's) gives a prefix of rendering all of them. The loss
mask relies on that (see masking.py), and it is checked for every example.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from unsloth_jax.errors import DataError

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Written as raw one-line pieces so no Jinja whitespace control is needed: "\n" inside a Jinja
# string literal is the only newline that reaches the output.
_CHATML = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen 2.5 is ChatML with a default system prompt when the conversation brings none.
_QWEN25 = (
    r"{% if messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + r"<|im_end|>\n' }}"
    r"{% endif %}" + _CHATML
)

_LLAMA3 = (
    r"{{ bos_token }}"
    r"{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r" + message['content'] | trim + '<|eot_id|>' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma has no system role: the system text is put in front of the first user turn.
_GEMMA = (
    r"{{ bos_token }}"
    r"{% if messages[0]['role'] == 'system' %}"
    r"{% set system_text = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    r"{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
    r"{% for message in turns %}"
    r"{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{% set text = (system_text if loop.first else '') + message['content'] | trim %}"
    r"{{ '<start_of_turn>' + role + '\n' + text + '<end_of_turn>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral [INST] format. The system text goes in front of the *first* user turn (Mistral's own
# v0.3 template puts it before the last one, which is not incremental).
_MISTRAL = (
    r"{{ bos_token }}"
    r"{% if messages[0]['role'] == 'system' %}"
    r"{% set system_text = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    r"{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
    r"{% for message in turns %}"
    r"{% if message['role'] == 'user' %}"
    r"{{ '[INST] ' + (system_text if loop.first else '') + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    r"{% endif %}"
    r"{% endfor %}"
)

_ALPACA = (
    r"{% if messages[0]['role'] == 'system' %}"
    r"{{ messages[0]['content'] + '\n\n' }}{% set turns = messages[1:] %}"
    r"{% else %}{{ '" + ALPACA_PREAMBLE + r"\n\n' }}{% set turns = messages %}{% endif %}"
    r"{% for message in turns %}"
    r"{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'assistant' %}"
    r"{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinTemplate:
    """A named template plus the special tokens a tokenizer needs for it.

    `eos` is the end-of-turn token; None means "the tokenizer's own eos_token"."""
    name: str
    jinja: str
    special_tokens: tuple[str, ...] = ()
    bos: str | None = None
    eos: str | None = None
    aliases: tuple[str, ...] = field(default=())


BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {t.name: t for t in [
    BuiltinTemplate("chatml", _CHATML, ("<|im_start|>", "<|im_end|>"), eos="<|im_end|>"),
    BuiltinTemplate("qwen-2.5", _QWEN25, ("<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                    aliases=("qwen2.5", "qwen25", "qwen-2", "qwen2")),
    BuiltinTemplate("llama-3", _LLAMA3,
                    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                    bos="<|begin_of_text|>", eos="<|eot_id|>",
                    aliases=("llama3", "llama-3.1", "llama3.1", "llama-31")),
    BuiltinTemplate("gemma", _GEMMA, ("<bos>", "<start_of_turn>", "<end_of_turn>"),
                    bos="<bos>", eos="<end_of_turn>", aliases=("gemma2", "gemma-2", "gemma3", "gemma-3")),
    BuiltinTemplate("mistral", _MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos="</s>"),
    BuiltinTemplate("alpaca", _ALPACA),
]}


def builtin_template(name: str) -> BuiltinTemplate | None:
    key = name.strip().lower().replace("_", "-")
    for template in BUILTIN_TEMPLATES.values():
        if key == template.name or key in template.aliases:
            return template
    return None


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: where it came from (for messages) and its Jinja source."""
    name: str
    jinja: str


def resolve_chat_template(tokenizer, chat_template: str | None = None) -> ChatTemplate:
    """Pick the template: a built-in name, a raw Jinja string, or (None) the tokenizer's own."""
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # older tokenizers store several named templates
            own = own.get("default")
        if not own:
            raise DataError(
                "the tokenizer has no chat_template, so chat data cannot be rendered. Fix: pass "
                f"chat_template=<name> (one of {sorted(BUILTIN_TEMPLATES)}) matching the model, "
                "e.g. chat_template='llama-3' for a Llama 3 base model, or use text data.")
        return ChatTemplate("tokenizer's own", own)
    if "{{" in chat_template or "{%" in chat_template:
        return ChatTemplate("custom", chat_template)
    builtin = builtin_template(chat_template)
    if builtin is None:
        raise DataError(f"unknown chat_template {chat_template!r}. Fix: use one of "
                        f"{sorted(BUILTIN_TEMPLATES)}, a Jinja template string, or None for the "
                        "tokenizer's own template.")
    return ChatTemplate(builtin.name, builtin.jinja)


def get_chat_template(tokenizer, chat_template: str):
    """Attach a built-in (or Jinja) template to the tokenizer, so that it is saved with it and used
    at generation time. Returns the same tokenizer (Unsloth's `get_chat_template` shape)."""
    tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template).jinja
    return tokenizer


def render(tokenizer, template: ChatTemplate, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render messages to text with the template (no tokenization)."""
    return tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


_PROBE_PROMPT = "Say ok."
_PROBE_REPLY = "ok"


def end_of_turn_text(tokenizer, template: ChatTemplate) -> str:
    """The text a template puts after an assistant message's content, e.g. '<|im_end|>'.

    Found once per template by rendering a one-turn probe conversation incrementally: what follows
    the reply in the assistant span, minus trailing whitespace (that whitespace separates turns and
    is not learned)."""
    prompt = render(tokenizer, template, [{"role": "user", "content": _PROBE_PROMPT}], True)
    full = render(tokenizer, template, [{"role": "user", "content": _PROBE_PROMPT},
                                        {"role": "assistant", "content": _PROBE_REPLY}], False)
    if not full.startswith(prompt):
        raise DataError(f"chat template {template.name!r} is not incremental: the rendered prompt "
                        "is not a prefix of the rendered conversation, so responses cannot be "
                        "located. Fix: pass a built-in chat_template (e.g. 'chatml').")
    span = full[len(prompt):]
    at = span.find(_PROBE_REPLY)
    if at < 0:
        raise DataError(f"chat template {template.name!r} does not render assistant messages "
                        "(a template without an assistant turn?). Fix: use a chat template that "
                        "renders role 'assistant', e.g. chat_template='chatml'.")
    return span[at + len(_PROBE_REPLY):].rstrip()


def check_end_of_turn(tokenizer, template: ChatTemplate) -> int:
    """The id of the single token a template ends assistant turns with (that token is trained, so
    generation can stop on it). DataError if there is none or it is not one token."""
    text = end_of_turn_text(tokenizer, template)
    if not text:
        raise DataError(f"chat template {template.name!r} ends an assistant turn with no "
                        "end-of-turn token, so a fine-tuned model would never learn to stop. Fix: "
                        "use a template that appends an EOS token after each assistant message.")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise DataError(f"chat template {template.name!r} ends turns with {text!r}, which this "
                        f"tokenizer splits into {len(ids)} tokens {ids} instead of one special "
                        "token. Fix: choose the template that matches the model (e.g. 'llama-3' for "
                        "Llama 3, 'gemma' for Gemma), or add the token to the tokenizer.")
    return int(ids[0])


def end_of_turn_token_ids(tokenizer, chat_template: str | ChatTemplate | None = None) -> list[int]:
    """Token ids that end a generated assistant turn: the template's end-of-turn token first, then
    the tokenizer's eos_token_id if different. Use as generation_config.eos_token_id.

    `chat_template` is resolved as in prepare_dataset (None: the tokenizer's own template)."""
    template = chat_template if isinstance(chat_template, ChatTemplate) else \
        resolve_chat_template(tokenizer, chat_template)
    stop = [check_end_of_turn(tokenizer, template)]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in stop:
        stop.append(int(eos))
    return stop
