"""`shardtune generate`: complete prompts with a trained adapter, rendering each prompt the way training rendered it.

A model fine-tuned on chat-formatted samples only answers well when the prompt is wrapped in the same chat template
with the assistant turn opened; a model trained on raw text wants raw text. The run's data config decides.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from shardtune.errors import ConfigError
from shardtune.export.adapter import RunInfo, load_for_inference, load_run

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in common templates; generation stops at any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>")


@dataclass
class PromptStyle:
    """How training turned a conversation into tokens: a chat template (None: the text verbatim) and whether a BOS
    token leads each sample. Built by `prompt_style` from the run record, with shardtune.data's own rules."""

    template: Optional[str]
    name: str
    bos_id: Optional[int] = None

    @property
    def chat(self) -> bool:
        return self.template is not None


def _bos_id(tokenizer) -> Optional[int]:
    # The data pipeline adds a BOS exactly where the tokenizer itself would (Llama does, Qwen does not).
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def prompt_style(info: Optional[RunInfo], tokenizer, chat: Optional[bool] = None) -> PromptStyle:
    """The run's rendering: data.chat_template resolved for the run's data format exactly as training resolved it.

    chat=True forces a chat template (the run's, or the tokenizer's own / chatml), chat=False raw text. A bare PEFT
    adapter without a run record uses the tokenizer's template when it has one, else raw text.
    """
    from shardtune.data import formats

    bos = _bos_id(tokenizer)
    if chat is False:
        return PromptStyle(None, "none", bos)
    data = info.data_cfg if info else {}
    if chat is None and not data:
        own = formats.tokenizer_template(tokenizer)
        return PromptStyle(own, "tokenizer", bos) if own else PromptStyle(None, "none", bos)
    choice = str(data.get("chat_template", "auto"))
    fmt = (info.data_format if info else None) or "auto"
    if chat is True:
        choice = "auto" if choice.lower() == "none" else choice
        fmt = "messages"
    elif fmt == "auto":  # a run record without the detected format: every format but text is rendered as chat
        fmt = "messages"
    template, name, notice = formats.resolve_chat_template(choice, tokenizer, fmt)
    if notice:
        log.info(notice)
    return PromptStyle(template, name, bos)


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def _pieces(messages: list[dict], answer: str, tokenizer, style: PromptStyle) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces of a conversation followed by `answer`, cut where training cuts them."""
    from shardtune.data import formats

    if style.template is None:  # verbatim: the user text, then the answer (prompt_completion / text with no template)
        return [("".join(m["content"] for m in messages), False), (answer, True)]

    def render(msgs, add_generation_prompt):
        return tokenizer.apply_chat_template(msgs, chat_template=style.template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    try:
        return formats.conversation_segments(messages + [{"role": "assistant", "content": answer}], render)
    except formats.TemplateNotIncremental:
        raise ConfigError(f"chat template '{style.name}' renders a conversation's start differently from the whole "
                          f"conversation; pass --raw, or train with data.chat_template=chatml") from None


def render_prompt_ids(prompt: str | list[dict], tokenizer, style: PromptStyle) -> list[int]:
    """Token ids of `prompt` as training rendered it, ending where the model's answer starts.

    `prompt` is the user's text, or a conversation (list of {'role', 'content'}) whose answer comes next. Each piece
    is tokenized on its own, as the data pipeline does, so the ids equal the prompt part of a training sample.
    """
    ids, n_prompt = render_example_ids(prompt, "x", tokenizer, style)  # the answer's content does not change the prompt
    return ids[:n_prompt]


def render_example_ids(prompt: str | list[dict], response: str, tokenizer, style: PromptStyle) -> tuple[list[int], int]:
    """(ids of prompt + response + EOS, number of leading prompt ids): the sample training would build, with the
    response (and, in chat templates, its end-of-turn marker) as the scored part."""
    pieces = _pieces(_as_messages(prompt), response, tokenizer, style)
    while pieces and pieces[-1][1] is False:  # the answer is last; nothing follows it
        pieces.pop()
    texts = [t for t, _ in pieces]
    tokenized = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[int] = [style.bos_id] if style.bos_id is not None else []
    for toks in tokenized[:-1]:
        ids += toks
    n_prompt = len(ids)
    answer = list(tokenized[-1]) if tokenized else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in answer:
        answer.append(tokenizer.eos_token_id)
    return ids + answer, n_prompt


def stop_token_ids(tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in vocab:
            ids.add(int(vocab[t]))
    return sorted(ids)


def generate_ids(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0) -> list[str]:
    """Generate from pre-rendered prompts in left-padded batches; return only the new text of each."""
    import torch

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    device = next(p.device for p in model.parameters())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    sample = temperature > 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad, eos_token_id=stops or None)
    if sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
        torch.manual_seed(seed)
    else:  # explicit, so a generation_config.json shipped with the base cannot turn sampling on
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)

    outputs: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = [list(p) for p in prompt_ids[start:start + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding: every row's answer starts at the same column
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return outputs


def generate(run_dir: str | Path, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             chat: Optional[bool] = None, *, model=None, tokenizer=None, base: str | Path | None = None,
             device: str = "auto", load_in_4bit: Optional[bool] = None, batch_size: int = 8, seed: int = 0) -> list[str]:
    """Complete each prompt with the run's adapter; greedy unless temperature > 0. Returns the completions only.

    chat=None follows the run (its data.chat_template for its data format, as training rendered it); True forces a
    chat template, False raw text. Pass `model` and `tokenizer` to
    reuse an already loaded model (evaluate does).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    info = load_run(run_dir, base=base)
    if model is None or tokenizer is None:
        model, tokenizer = load_for_inference(run_dir, device=device, load_in_4bit=load_in_4bit, info=info)
    style = prompt_style(info, tokenizer, chat)
    ids = [render_prompt_ids(p, tokenizer, style) for p in prompts]
    return generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size, seed=seed)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Complete prompts with a trained adapter (greedy by default)."
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts; '-' reads one from stdin")
    parser.add_argument("--adapter", required=True, metavar="RUN_DIR",
                        help="training run directory (output.dir) or a PEFT adapter directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap prompts in the chat template (default: as in training)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="pass prompts as raw text")
    parser.add_argument("--base", metavar="DIR", help="base model directory, when the recorded one moved")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", default=None,
                        help="load a qlora run's base unquantized")


def run(args: argparse.Namespace) -> int:
    import sys

    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    outs = generate(args.adapter, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    chat=args.chat, base=args.base, device=args.device, load_in_4bit=args.load_in_4bit)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if len(prompts) > 1:
            print(f"--- [{i + 1}] {p[:60]!r}")
        print(o)
    return 0
