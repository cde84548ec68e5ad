"""Train a cache fuser: both LLMs frozen, cross-entropy on the response tokens only, AdamW on the fuser alone.

Per example: the receiver prefills its context, the transmitter prefills the same text, the fuser adds its
residuals, and the receiver reads the response with the fused cache as `past_key_values`. The receiver's cache
covers the context minus its last token; that token is fed with the response, so even the first response token is
predicted by a query that attends to the fused cache (a cache of the whole context would leave that prediction to
the unfused prefill). Inference does the same: prefill context[:-1], fuse, generate from the full context.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from transformers import DynamicCache

from fedlm.data.gsm8k import load_gsm8k
from fedlm.kvcomm.align import LayerAlign, align_tokens, context_text, encode_with_spans
from fedlm.kvcomm.fuser import KV, CacheFuser, FuserConfig, add_residuals
from fedlm.kvcomm.wire import model_fingerprint
from fedlm.models.chat import chat_prompt_ids
from fedlm.models.loader import LoadedModel

Pair = tuple[str, str]  # (context exactly as the receiver reads it, chat markers written out; response text)


@dataclass
class Example:
    """One pair tokenised for both models, with the transmitter token paired to each receiver context token."""

    context_ids: list[int]
    transmitter_ids: list[int]
    token_map: Tensor
    response_ids: list[int]


@dataclass
class Prefill:
    receiver_cache: DynamicCache  # context[:-1]; never appended to (fusing copies it)
    transmitter_kv: list[KV]  # per transmitter layer, the whole context
    transmitter_len: int


@dataclass
class FuserTrainConfig:
    steps: int = 200  # optimizer steps
    accumulate: int = 4  # examples per step (batch 1 each: lengths differ)
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature_start: float = 1.0  # of the Gumbel-sigmoid gates, annealed geometrically to the end value
    temperature_end: float = 0.1
    eval_every: int = 25
    max_response_tokens: int = 48
    cache_prefills: bool = True  # keep training prefills in memory (≈80 KB per context token): worth it from epoch 2
    keep_best: bool = True  # end on the weights with the lowest held-out loss (small data overfits)
    seed: int = 0


@dataclass
class LearningCurve:
    train_loss: list[float] = field(default_factory=list)  # per optimizer step, mean over its examples
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)  # held-out, hard gates, per response token
    receiver_alone_loss: float | None = None  # the same held-out pairs without any fusion
    zeroed_transmitter_loss: float | None = None  # the final fuser fed all-zero transmitter caches: the control
    best_step: int | None = None  # whose weights the fuser ends with, under `keep_best`
    seconds: float = 0.0


def prepare(receiver: LoadedModel, transmitter: LoadedModel, pair: Pair, max_response_tokens: int = 48) -> Example:
    """Tokenise a pair for both models and align the tokens by character spans of the shared context text."""
    context, response = pair
    context_ids = receiver.tokenizer(context, add_special_tokens=False)["input_ids"]
    if len(context_ids) < 2:
        raise ValueError("a context needs at least two receiver tokens")
    text, receiver_spans = context_text(receiver, context_ids)
    transmitter_ids, transmitter_spans = encode_with_spans(transmitter, text)
    response_ids = receiver.tokenizer(response, add_special_tokens=False)["input_ids"][:max_response_tokens]
    if not response_ids:
        raise ValueError("empty response")
    return Example(context_ids, transmitter_ids, align_tokens(receiver_spans, transmitter_spans), response_ids)


@torch.no_grad()
def prefill_receiver(receiver: LoadedModel, context_ids: Sequence[int]) -> DynamicCache:
    """The receiver's cache of context[:-1] (see the module docstring for why the last token is left out)."""
    ids = torch.tensor([context_ids[:-1]], device=receiver.model.device)
    out = receiver.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values


@torch.no_grad()
def prefill_transmitter(transmitter: LoadedModel, transmitter_ids: Sequence[int]) -> tuple[list[KV], int]:
    """The transmitter's (K, V) per layer over the whole context, and how many tokens it read."""
    ids = torch.tensor([transmitter_ids], device=transmitter.model.device)
    cache = transmitter.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.past_key_values.layers], len(transmitter_ids)


def prefill(receiver: LoadedModel, transmitter: LoadedModel, example: Example) -> Prefill:
    transmitter_kv, transmitter_len = prefill_transmitter(transmitter, example.transmitter_ids)
    return Prefill(prefill_receiver(receiver, example.context_ids), transmitter_kv, transmitter_len)


def zeroed(prefilled: Prefill) -> Prefill:
    """The same prefill with the transmitter's cache all zero: what the fuser does with it is its own adaptation
    of the receiver's cache, so only a fused loss below this one came from the transmitter."""
    kv = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in prefilled.transmitter_kv]
    return Prefill(prefilled.receiver_cache, kv, prefilled.transmitter_len)


def response_loss(receiver: LoadedModel, cache: DynamicCache, example: Example) -> tuple[Tensor, int]:
    """Summed cross-entropy of the response tokens given `cache` (context[:-1]), and how many tokens it covers."""
    device = receiver.model.device
    inputs = torch.tensor([[example.context_ids[-1], *example.response_ids[:-1]]], device=device)
    logits = receiver.model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0]
    targets = torch.tensor(example.response_ids, device=device)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), len(targets)


def fused_loss(fuser: CacheFuser, receiver: LoadedModel, example: Example, prefilled: Prefill) -> tuple[Tensor, int]:
    fused = fuser.fuse(
        prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1], prefilled.transmitter_len
    )
    return response_loss(receiver, fused, example)


@torch.no_grad()
def evaluate(
    fuser: CacheFuser | None,
    receiver: LoadedModel,
    examples: Sequence[Example],
    prefills: Callable[[int], Prefill],
) -> float:
    """Mean cross-entropy per response token, fused with hard gates (or the receiver alone when `fuser` is None);
    `prefills(i)` is example i's prefill (with the transmitter that read it)."""
    if fuser is not None:
        was_training = fuser.training
        fuser.eval()
    total, count = 0.0, 0
    for i, example in enumerate(examples):
        prefilled = prefills(i)
        if fuser is None:
            loss, n = response_loss(receiver, add_residuals(prefilled.receiver_cache, []), example)
        else:
            loss, n = fused_loss(fuser, receiver, example, prefilled)
        total, count = total + float(loss), count + n
    if fuser is not None:
        fuser.train(was_training)
    return total / count


def freeze(model: LoadedModel) -> None:
    model.model.requires_grad_(False)
    model.model.eval()


@dataclass(frozen=True)
class Taught:
    """Pairs whose answers one transmitter knows. A fuser trained over several (models of one architecture that
    each learned other facts) learns to read an answer off any such cache, not off one adapter's."""

    transmitter: LoadedModel
    train: Sequence[Pair]
    heldout: Sequence[Pair] = ()


def train(
    fuser: CacheFuser,
    receiver: LoadedModel,
    transmitter: LoadedModel,
    train_pairs: Sequence[Pair],
    heldout_pairs: Sequence[Pair] = (),
    config: FuserTrainConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> LearningCurve:
    """Fit `fuser` on (context, response) pairs read by one transmitter (see `train_many`)."""
    return train_many(fuser, receiver, [Taught(transmitter, train_pairs, heldout_pairs)], config, on_step, progress)


def train_many(
    fuser: CacheFuser,
    receiver: LoadedModel,
    lessons: Sequence[Taught],
    config: FuserTrainConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> LearningCurve:
    """Fit `fuser` on every lesson's pairs, each read by its own transmitter; all LLMs are frozen (and left frozen,
    in eval mode).

    The fuser must already sit on the models' device (`fuser.to(receiver.model.device)` on a GPU).

    Returns the training loss per step and the held-out loss every `eval_every` steps and at the end, next to
    the receiver-alone loss on the same held-out pairs and, as a control, the final fuser's loss with the
    transmitter's cache zeroed. With held-out pairs and `keep_best`, the fuser ends on
    the weights of its best held-out evaluation.
    """
    config = config or FuserTrainConfig()
    torch.manual_seed(config.seed)
    freeze(receiver)
    for lesson in lessons:
        freeze(lesson.transmitter)
    start = time.perf_counter()

    def examples_of(part: str) -> list[tuple[LoadedModel, Example]]:
        return [
            (lesson.transmitter, prepare(receiver, lesson.transmitter, pair, config.max_response_tokens))
            for lesson in lessons
            for pair in getattr(lesson, part)
        ]

    train_examples, heldout = examples_of("train"), examples_of("heldout")
    if not train_examples:
        raise ValueError("no pairs to train on")

    def prefills_of(examples: Sequence[tuple[LoadedModel, Example]], keep: bool) -> Callable[[int], Prefill]:
        kept: dict[int, Prefill] = {}

        def get(i: int) -> Prefill:
            if not keep:
                return prefill(receiver, *examples[i])
            if i not in kept:
                kept[i] = prefill(receiver, *examples[i])
            return kept[i]

        return get

    # Held-out prefills are always kept: every evaluation reads the same few pairs again.
    train_prefill, heldout_prefill = prefills_of(train_examples, config.cache_prefills), prefills_of(heldout, True)
    heldout_examples = [example for _, example in heldout]
    curve = LearningCurve()
    if heldout:
        curve.receiver_alone_loss = evaluate(None, receiver, heldout_examples, heldout_prefill)
    optimizer = torch.optim.AdamW(
        [p for p in fuser.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    fuser.train()
    columns = (TextColumn("[bold]fuser {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("", total=config.steps)
        for step in range(config.steps):
            ratio = config.temperature_end / config.temperature_start
            fuser.temperature = config.temperature_start * ratio ** (step / max(config.steps - 1, 1))
            step_loss = 0.0
            for k in range(config.accumulate):
                i = order[(step * config.accumulate + k) % len(order)]
                loss, n = fused_loss(fuser, receiver, train_examples[i][1], train_prefill(i))
                (loss / n / config.accumulate).backward()
                step_loss += loss.item() / n / config.accumulate
            torch.nn.utils.clip_grad_norm_(fuser.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.train_loss.append(step_loss)
            if heldout and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                curve.eval_steps.append(step + 1)
                curve.eval_loss.append(evaluate(fuser, receiver, heldout_examples, heldout_prefill))
                if config.keep_best and curve.eval_loss[-1] == min(curve.eval_loss):
                    curve.best_step = step + 1
                    best = {k: v.detach().clone() for k, v in fuser.state_dict().items()}
            if on_step:
                on_step(step + 1, step_loss)
            held = f" held-out {curve.eval_loss[-1]:.3f}" if curve.eval_loss else ""
            bar.update(task, advance=1, description=f"loss {step_loss:.3f}{held} τ {fuser.temperature:.2f}")
    if curve.best_step is not None:
        fuser.load_state_dict(best)
    if heldout:
        control = evaluate(fuser, receiver, heldout_examples, lambda i: zeroed(heldout_prefill(i)))
        curve.zeroed_transmitter_loss = control
    fuser.eval()
    curve.seconds = time.perf_counter() - start
    return curve


class PairSetupError(ValueError):
    """A setting that cannot serve this model pair; `option` names it (`transmitter_layers`, `device` or `more`)."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def train_pair(
    receiver: LoadedModel,
    transmitter: LoadedModel,
    train_pairs: Sequence[Pair],
    heldout_pairs: Sequence[Pair],
    schedule: FuserTrainConfig,
    *,
    data: str,
    align: LayerAlign = "last",
    hidden: int = 256,
    transmitter_layers: Sequence[int] | None = None,
    device: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
    more: Sequence[Taught] = (),
) -> tuple[CacheFuser, LearningCurve]:
    """A fuser for receiver <- transmitter, trained on `train_pairs` (both models frozen); not yet saved.

    `more` adds pairs read by other transmitters of the same model (other adapters: weights are not part of a
    fuser's fingerprint), so the fuser learns what any of them carries, not one adapter's quirks.

    The fuser reads only `transmitter_layers` (default: all; only these then cross the wire). With `device`, both
    models and the fuser move there first. Its config keeps the provenance: the `data` it learned, the pair counts,
    the schedule, the learning curve (held out: `heldout_pairs`) and its parameter count. Raises `PairSetupError`
    for a layer the transmitter lacks or a device that cannot be used, before any training.
    """
    config = FuserConfig.for_pair(receiver, transmitter, align, hidden)
    if transmitter_layers is not None:
        unknown = [layer for layer in transmitter_layers if layer >= config.transmitter_layers]
        if unknown:
            raise PairSetupError(
                f"{transmitter.name} has {config.transmitter_layers} layers; no layer {unknown}", "transmitter_layers"
            )
        config.layer_map = [layer if layer in transmitter_layers else None for layer in config.layer_map]
    if device is not None:
        try:
            receiver.model.to(device)
            transmitter.model.to(device)
        except (RuntimeError, ValueError) as err:
            raise PairSetupError(f"cannot use device {device!r}: {err}", "device") from err
    for lesson in more:
        if model_fingerprint(lesson.transmitter) != config.transmitter_fingerprint:
            raise PairSetupError(f"{lesson.transmitter.name} is not a {transmitter.name} model", "more")
    fuser = CacheFuser(config).to(device) if device is not None else CacheFuser(config)
    lessons = [Taught(transmitter, train_pairs, heldout_pairs), *more]
    curve = train_many(fuser, receiver, lessons, schedule, on_step, progress)
    fuser.config.extra = {
        "data": data,
        "transmitters": len(lessons),
        "train_pairs": sum(len(lesson.train) for lesson in lessons),
        "heldout_pairs": sum(len(lesson.heldout) for lesson in lessons),
        "schedule": schedule.__dict__,
        "curve": curve.__dict__,
        "parameters": sum(p.numel() for p in fuser.parameters()),
    }
    return fuser, curve


def chat_context(receiver: LoadedModel, question: str) -> str:
    """A user question in the receiver's chat format, as text (markers written out) ending at the answer's start."""
    ids = chat_prompt_ids(receiver.tokenizer, [{"role": "user", "content": question}])
    return receiver.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def gsm8k_pairs(receiver: LoadedModel, count: int, start: int = 0) -> list[Pair]:
    """GSM8K rows start..start+count as (chat-formatted question, worked answer) pairs.

    The `<<48/2=24>>` calculator annotations are dropped from answers: no chat model writes them, and they would
    dominate the loss of a short answer.
    """
    rows = load_gsm8k(start + count)[start:]
    return [(chat_context(receiver, row.question), re.sub(r"<<[^>]*>>", "", row.answer)) for row in rows]
