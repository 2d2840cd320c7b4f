"""`shardtune generate`: complete prompts with a trained adapter, rendering each prompt the way training rendered it.

A model fine-tuned on chat-formatted samples only answers well when the prompt is wrapped in the same chat template
with the assistant turn opened; a model trained on raw text wants raw text. The run's data config decides.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from shardtune.errors import ConfigError
from shardtune.export.adapter import RunInfo, load_for_inference, load_run

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in common templates; generation stops at any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>")


def uses_chat(info: Optional[RunInfo], tokenizer) -> bool:
    """Whether training wrapped samples in a chat template: every format but raw `text` does, unless the run asked
    for data.chat_template=plain."""
    data = info.data_cfg if info else {}
    fmt = (info.data_format if info else None) or data.get("format", "auto")
    if fmt == "text" or data.get("chat_template") == "plain":
        return False
    if fmt == "auto" and info is not None and info.data_format is None and not data:
        # A bare adapter without a run record: chat if the tokenizer has a template.
        return bool(getattr(tokenizer, "chat_template", None))
    return True


def _template_for(tokenizer, data_cfg: dict) -> Optional[str]:
    """The chat template to render with: the tokenizer's own (training saves it with the adapter), else the named one."""
    name = data_cfg.get("chat_template", "auto")
    if name == "auto" and getattr(tokenizer, "chat_template", None):
        return None  # tokenizer default
    if name in ("auto", "chatml"):
        from shardtune.model.tiny import CHATML_TEMPLATE

        return CHATML_TEMPLATE
    try:  # the data pipeline owns the other named templates
        from shardtune.data import formats  # type: ignore

        templates = getattr(formats, "CHAT_TEMPLATES", None) or getattr(formats, "TEMPLATES", None) or {}
        if name in templates:
            return templates[name]
    except ImportError:
        pass
    raise ConfigError(f"data.chat_template={name!r} is not known to `generate`; "
                      f"use the tokenizer's own template (auto) or chatml")


def render_prompt_ids(prompt: str | list[dict], tokenizer, chat: bool, data_cfg: Optional[dict] = None) -> list[int]:
    """Token ids of `prompt` as training rendered it, ending where the model's answer starts.

    `prompt` is the user's text, or a conversation (list of {'role', 'content'}) whose answer comes next. In chat
    mode it is wrapped in the chat template with the assistant turn opened; in raw mode it is tokenized as is.
    """
    data_cfg = data_cfg or {}
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not chat:
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
        return list(tokenizer(text)["input_ids"])
    enc = tokenizer.apply_chat_template(messages, chat_template=_template_for(tokenizer, data_cfg), tokenize=True,
                                        add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def render_example_ids(prompt: str | list[dict], response: str, tokenizer, chat: bool,
                       data_cfg: Optional[dict] = None) -> tuple[list[int], int]:
    """(ids of prompt + response, number of leading prompt tokens): the response tokens are the ones scored, as in
    training with train_on_prompt=false. In chat mode the response includes the template's end-of-turn tokens."""
    data_cfg = data_cfg or {}
    prompt_ids = render_prompt_ids(prompt, tokenizer, chat, data_cfg)
    if not chat:
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
        full = list(tokenizer(text + response)["input_ids"])
        if tokenizer.eos_token_id is not None:
            full.append(int(tokenizer.eos_token_id))
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = messages + [{"role": "assistant", "content": response}]
        full = list(tokenizer.apply_chat_template(messages, chat_template=_template_for(tokenizer, data_cfg),
                                                  tokenize=True, return_dict=True)["input_ids"])
    # Normally the prompt is an exact prefix; a template that renders it differently once an answer follows (or a
    # BPE merge across the raw-text boundary) shortens the shared prefix, and everything after it is scored.
    n_prompt = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        n_prompt += 1
    return full, n_prompt


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

    chat=None follows the run (chat template for every data format but raw text). Pass `model` and `tokenizer` to
    reuse an already loaded model (evaluate does).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    info = load_run(run_dir, base=base)
    if model is None or tokenizer is None:
        model, tokenizer = load_for_inference(run_dir, device=device, load_in_4bit=load_in_4bit, info=info)
    use_chat = uses_chat(info, tokenizer) if chat is None else chat
    ids = [render_prompt_ids(p, tokenizer, use_chat, info.data_cfg) for p in prompts]
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
