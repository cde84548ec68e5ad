"""The C2C-style cache fuser and its training, on tiny random models of two different layouts and tokenizers."""

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from fedlm.kvcomm.fuser import WEIGHTS_FILE, CacheFuser, FuserConfig, FuserError, FuserMismatchError, add_residuals
from fedlm.kvcomm.train import (
    Example,
    FuserTrainConfig,
    Taught,
    evaluate,
    gsm8k_pairs,
    prefill,
    prepare,
    response_loss,
    train,
    train_many,
    zeroed,
)
from fedlm.models.loader import LoadedModel
from fedlm.models.tiny import tiny_tokenizer

# Wider initial weights than HF's 0.02: logits then depend on the context enough for a fuser to move them.
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2
)
PAIRS = [
    ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "The capital is Paris."),
    ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", "Answer: four"),
    ("<|im_start|>user\nOnce upon a time, a keeper<|im_end|>\n<|im_start|>assistant\n", "watched the sea."),
    ("<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n", "    return a + b"),
]


def receiver_model(arch: str = "llama") -> LoadedModel:
    """4 layers, 2 KV heads of 8: the receiver's layout (a gemma receiver exercises sliding layers on its side)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(vocab_size=400)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=4, num_key_value_heads=2, **SMALL)
        )
    else:
        config = Gemma3TextConfig(
            vocab_size=len(tokenizer), num_hidden_layers=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
            layer_types=["sliding_attention", "full_attention"] * 2, **SMALL,
        )  # fmt: skip
        model = Gemma3ForCausalLM(config)
    return LoadedModel(f"tiny-receiver-{arch}", model.eval(), tokenizer)


def transmitter_model(seed: int = 1) -> LoadedModel:
    """3 gemma layers, 1 KV head of 16, another tokenizer, and a sliding window shorter than the contexts."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(vocab_size=300)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), num_hidden_layers=3, num_key_value_heads=1, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], **SMALL,
    )  # fmt: skip
    return LoadedModel("tiny-transmitter", Gemma3ForCausalLM(config).eval(), tokenizer)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; two oversubscribe the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def receiver() -> LoadedModel:
    return receiver_model()


@pytest.fixture(scope="module")
def transmitter() -> LoadedModel:
    return transmitter_model()


def scramble(fuser: CacheFuser, seed: int = 0) -> CacheFuser:
    """Give every projection's zero-initialised last layer random weights, as a trained fuser would have."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fuser.projectors.w3.copy_(torch.randn(fuser.projectors.w3.shape, generator=generator))
    return fuser


def response_logits(receiver: LoadedModel, cache, example: Example) -> torch.Tensor:
    inputs = [example.context_ids[-1], *example.response_ids]
    with torch.no_grad():
        return receiver.model(input_ids=torch.tensor([inputs]), past_key_values=cache, use_cache=True).logits


def fused_logits(fuser: CacheFuser, receiver: LoadedModel, transmitter: LoadedModel, pair) -> torch.Tensor:
    example = prepare(receiver, transmitter, pair)
    prefilled = prefill(receiver, transmitter, example)
    fused = fuser.fuse(prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1])
    return response_logits(receiver, fused, example)


def alone_logits(receiver: LoadedModel, transmitter: LoadedModel, pair) -> torch.Tensor:
    example = prepare(receiver, transmitter, pair)
    return response_logits(receiver, prefill(receiver, transmitter, example).receiver_cache, example)


def test_residuals_have_the_receiver_shapes_on_paired_layers_only(receiver, transmitter) -> None:
    config = FuserConfig.for_pair(receiver, transmitter, align="last", hidden=16)
    assert config.layer_map == [None, 0, 1, 2]
    fuser = scramble(CacheFuser(config))
    example = prepare(receiver, transmitter, PAIRS[0])
    prefilled = prefill(receiver, transmitter, example)
    residuals = fuser.residuals(prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1])
    assert sorted(residuals) == [1, 2, 3]
    for r, (delta_k, delta_v) in residuals.items():
        layer = prefilled.receiver_cache.layers[r]
        assert delta_k.shape == layer.keys.shape == (1, 2, len(example.context_ids) - 1, 8)
        assert delta_v.shape == layer.values.shape
    fused = fuser.fuse(prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1])
    assert fused.get_seq_length() == prefilled.receiver_cache.get_seq_length()
    assert torch.equal(fused.layers[0].keys, prefilled.receiver_cache.layers[0].keys)  # unpaired layer untouched
    assert not torch.equal(fused.layers[3].keys, prefilled.receiver_cache.layers[3].keys)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_fresh_fuser_reproduces_the_receiver_exactly(arch: str, transmitter) -> None:
    receiver = receiver_model(arch)
    fuser = CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=16)).train()
    for pair in PAIRS:
        assert torch.equal(fused_logits(fuser, receiver, transmitter, pair), alone_logits(receiver, transmitter, pair))


def test_a_closed_hard_gate_reproduces_the_receiver_and_an_open_one_does_not(receiver, transmitter) -> None:
    fuser = scramble(CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=16))).eval()
    alone = alone_logits(receiver, transmitter, PAIRS[1])
    assert not torch.allclose(fused_logits(fuser, receiver, transmitter, PAIRS[1]), alone, atol=1e-3)
    with torch.no_grad():
        for name, parameter in fuser.named_parameters():
            if name.endswith("gate_logit"):
                parameter.fill_(-0.5)
    assert torch.equal(fused_logits(fuser, receiver, transmitter, PAIRS[1]), alone)


def test_gradients_reach_the_fuser_and_not_the_models(receiver, transmitter) -> None:
    for model in (receiver, transmitter):
        model.model.requires_grad_(False)
    fuser = CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=16)).train()
    example = prepare(receiver, transmitter, PAIRS[0])
    prefilled = prefill(receiver, transmitter, example)
    fused = fuser.fuse(prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1])
    loss, _ = response_loss(receiver, fused, example)
    loss.backward()
    for model in (receiver, transmitter):
        assert all(p.grad is None for p in model.model.parameters())
    # every slot's zero-initialised last layer (each fused layer's K and V) learns first
    assert (fuser.projectors.w3.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_the_receivers_cache_is_never_changed_by_fusing_and_reading(receiver, transmitter) -> None:
    fuser = scramble(CacheFuser(FuserConfig.for_pair(receiver, transmitter, hidden=16)))
    example = prepare(receiver, transmitter, PAIRS[2])
    prefilled = prefill(receiver, transmitter, example)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefilled.receiver_cache.layers]
    fused = fuser.fuse(prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1])
    response_loss(receiver, fused, example)
    assert fused.get_seq_length() == len(example.context_ids) + len(example.response_ids) - 1
    assert prefilled.receiver_cache.get_seq_length() == len(example.context_ids) - 1
    for (keys, values), layer in zip(before, prefilled.receiver_cache.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_residuals_of_several_transmitters_add_up_and_a_masked_one_adds_nothing(receiver, transmitter) -> None:
    other = transmitter_model(seed=2)
    first = scramble(CacheFuser(FuserConfig.for_pair(receiver, transmitter, hidden=16)), seed=1).eval()
    second = scramble(CacheFuser(FuserConfig.for_pair(receiver, other, hidden=16)), seed=2).eval()
    a, b = prepare(receiver, transmitter, PAIRS[3]), prepare(receiver, other, PAIRS[3])
    pa, pb = prefill(receiver, transmitter, a), prefill(receiver, other, b)
    cache = pa.receiver_cache
    ra = first.residuals(cache, pa.transmitter_kv, a.token_map[:-1])
    rb = second.residuals(cache, pb.transmitter_kv, b.token_map[:-1])
    both = add_residuals(cache, [ra, rb])
    for r in ra:
        assert torch.allclose(both.layers[r].keys, cache.layers[r].keys + ra[r][0] + rb[r][0])
        assert torch.allclose(both.layers[r].values, cache.layers[r].values + ra[r][1] + rb[r][1])
    only_first = add_residuals(cache, [ra])
    assert all(
        torch.equal(x.keys, y.keys)
        for x, y in zip(only_first.layers, first.fuse(cache, pa.transmitter_kv, a.token_map[:-1]).layers, strict=True)
    )


def test_tokens_outside_a_sliding_transmitter_window_are_left_alone(receiver, transmitter) -> None:
    fuser = scramble(CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="last", hidden=16))).eval()
    example = prepare(receiver, transmitter, PAIRS[0])
    prefilled = prefill(receiver, transmitter, example)
    window_rows = prefilled.transmitter_kv[0][0].shape[-2]  # transmitter layer 0 slides: it kept its last rows
    assert window_rows < prefilled.transmitter_len
    residuals = fuser.residuals(
        prefilled.receiver_cache, prefilled.transmitter_kv, example.token_map[:-1], prefilled.transmitter_len
    )
    inside = example.token_map[:-1] >= prefilled.transmitter_len - window_rows
    delta_k = residuals[1][0][0].abs().sum(dim=(0, 2))  # receiver layer 1 <- transmitter layer 0, per token
    assert torch.equal(delta_k > 0, inside) and inside.any() and not inside.all()
    only_full = fuser.residuals(
        prefilled.receiver_cache, {2: prefilled.transmitter_kv[2]}, example.token_map[:-1], prefilled.transmitter_len
    )
    assert sorted(only_full) == [3]  # a subset of transmitter layers fuses only their partners


def slot_residual(projectors, slot: int, receiver_kv: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """One slot's residual written out on its own ([batch, heads, rows, dim] each): the definition the batched
    projectors must match."""
    norm = torch.nn.functional.layer_norm
    p = {name: value[slot] for name, value in projectors.named_parameters()}
    batch, heads, rows, dim = receiver_kv.shape
    own = norm(receiver_kv.transpose(1, 2).reshape(batch, rows, -1), (heads * dim,))
    theirs = sent.transpose(1, 2).reshape(batch, rows, -1)
    theirs = norm(theirs, theirs.shape[-1:]) * p["transmitter_norm_weight"] + p["transmitter_norm_bias"]
    x = torch.cat([own * p["receiver_norm_weight"] + p["receiver_norm_bias"], theirs], dim=-1)
    h = torch.nn.functional.gelu(x @ p["w1"] + p["b1"])
    h = torch.nn.functional.gelu(h @ p["w2"] + p["b2"])
    projection = (h @ p["w3"] + p["b3"]).view(batch, rows, heads, dim)
    weights = torch.sigmoid(x @ p["head_w"] + p["head_b"]).unsqueeze(-1)
    return (float(p["gate_logit"] > 0) * weights * projection).transpose(1, 2)


def test_batched_slots_match_each_layer_computed_alone() -> None:
    """A gemma receiver's sliding layers hold fewer rows than its full ones, so the slots run in two groups; with a
    transmitter layer missing, each group runs a subset of the slots."""
    receiver, transmitter = receiver_model("gemma3"), transmitter_model()
    fuser = scramble(CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=16))).eval()
    with torch.no_grad():
        fuser.projectors.gate_logit[2:4] = -1.0  # layer 1's K and V gates closed
    example = prepare(receiver, transmitter, PAIRS[2])
    prefilled = prefill(receiver, transmitter, example)
    cache, pairs, length = prefilled.receiver_cache, example.token_map[:-1], prefilled.transmitter_len
    assert len({layer.keys.shape[-2] for layer in cache.layers}) == 2  # sliding layers hold fewer rows
    sent = dict(enumerate(prefilled.transmitter_kv))
    del sent[1]
    with torch.no_grad():
        residuals = fuser.residuals(cache, sent, pairs, length)
    kept = [i for i, r in enumerate(fuser.fused_layers) if fuser.config.layer_map[r] in sent]
    assert sorted(residuals) == [fuser.fused_layers[i] for i in kept] and len(kept) < len(fuser.fused_layers)
    for i in kept:
        r = fuser.fused_layers[i]
        layer, (keys, values) = cache.layers[r], sent[fuser.config.layer_map[r]]
        rows = layer.keys.shape[-2]
        index = pairs[len(pairs) - rows :] - (length - keys.shape[-2])
        inside = (index >= 0).float().view(1, 1, rows, 1)
        for kind, (own, theirs) in enumerate(((layer.keys, keys), (layer.values, values))):
            expected = slot_residual(fuser.projectors, 2 * i + kind, own, theirs[:, :, index.clamp(min=0)]) * inside
            torch.testing.assert_close(residuals[r][kind], expected, atol=1e-5, rtol=1e-4)
            assert (expected.abs().sum() > 0) == (i != 1)  # closed gates add nothing, open ones add something


def test_training_fits_a_small_fixed_batch(receiver, transmitter) -> None:
    fuser = CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=32))
    config = FuserTrainConfig(steps=40, accumulate=4, lr=1e-2, eval_every=20, temperature_end=0.2)
    seen: list[int] = []
    curve = train(
        fuser, receiver, transmitter, PAIRS, PAIRS, config, on_step=lambda s, _: seen.append(s), progress=False
    )
    assert seen == list(range(1, 41)) and len(curve.train_loss) == 40 and curve.eval_steps == [20, 40]
    assert curve.receiver_alone_loss is not None and curve.receiver_alone_loss > 6  # a random model: log(400) ≈ 6
    # Hard gates on the very pairs it trained on: the fuser memorised them (it reaches about 4 nats here).
    assert curve.eval_loss[-1] < curve.receiver_alone_loss - 1.0
    assert not any(p.requires_grad for p in receiver.model.parameters())
    assert curve.best_step == curve.eval_steps[curve.eval_loss.index(min(curve.eval_loss))]
    examples = [prepare(receiver, transmitter, pair) for pair in PAIRS]
    prefills = [prefill(receiver, transmitter, e) for e in examples]
    assert evaluate(fuser, receiver, examples, prefills.__getitem__) == pytest.approx(min(curve.eval_loss), rel=1e-5)
    # The control reads the same pairs with every transmitter key and value zeroed, and differs from the fused loss.
    assert all(not k.any() and not v.any() for p in prefills for k, v in zeroed(p).transmitter_kv)
    control = evaluate(fuser, receiver, examples, lambda i: zeroed(prefills[i]))
    assert curve.zeroed_transmitter_loss == pytest.approx(control, rel=1e-5)
    assert control != pytest.approx(min(curve.eval_loss), rel=1e-3)


def test_training_over_several_transmitters_reads_each_pair_with_its_own(receiver, transmitter) -> None:
    """Each lesson's pairs are prefilled by that lesson's transmitter: a twin whose weights differ gives other
    caches, so the same pairs then train and score differently."""
    twin = copy.deepcopy(transmitter)
    with torch.no_grad():
        for param in twin.model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    config = FuserTrainConfig(steps=4, accumulate=2, lr=1e-2, eval_every=2)
    curves = []
    for second in (transmitter, twin):
        torch.manual_seed(0)
        fuser = CacheFuser(FuserConfig.for_pair(receiver, transmitter, align="depth", hidden=16))
        lessons = [Taught(transmitter, PAIRS[:2], PAIRS[2:3]), Taught(second, PAIRS[2:], PAIRS[:1])]
        curves.append(train_many(fuser, receiver, lessons, config, progress=False))
    assert len(curves[0].train_loss) == 4 and curves[0].eval_steps == [2, 4]
    assert curves[0].receiver_alone_loss == pytest.approx(curves[1].receiver_alone_loss)  # the receiver's own
    assert curves[0].eval_loss != pytest.approx(curves[1].eval_loss, rel=1e-4)  # the twin's caches differ
    with pytest.raises(ValueError, match="no pairs"):
        train_many(fuser, receiver, [Taught(transmitter, [])], config, progress=False)


def test_save_and_load_round_trip_and_refuse_another_pair_or_layout(receiver, transmitter, tmp_path: Path) -> None:
    fuser = scramble(CacheFuser(FuserConfig.for_pair(receiver, transmitter, hidden=16)))
    fuser.config.extra["note"] = "kept"
    fuser.save(tmp_path / "fuser")
    loaded = CacheFuser.load(tmp_path / "fuser", receiver, transmitter)
    assert loaded.config == fuser.config and not loaded.training
    assert all(
        torch.equal(a, b) for a, b in zip(fuser.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    fuser.eval()
    assert torch.equal(
        fused_logits(loaded, receiver, transmitter, PAIRS[0]), fused_logits(fuser, receiver, transmitter, PAIRS[0])
    )
    assert CacheFuser.load(tmp_path / "fuser", fuser.config.receiver_fingerprint, fuser.config.transmitter_fingerprint)
    with pytest.raises(FuserMismatchError, match="trained with transmitter 'tiny-transmitter'"):
        CacheFuser.load(tmp_path / "fuser", receiver, receiver_model("gemma3"))
    with pytest.raises(FuserMismatchError, match="trained with receiver 'tiny-receiver-llama'"):
        CacheFuser.load(tmp_path / "fuser", transmitter, transmitter)
    weights = tmp_path / "fuser" / WEIGHTS_FILE
    state = load_file(weights)
    save_file({k.replace("projectors.", "layers.1.key."): v for k, v in state.items()}, weights)  # another layout
    with pytest.raises(FuserError, match="do not fit this fedlm's fuser"):
        CacheFuser.load(tmp_path / "fuser", receiver, transmitter)


def test_gsm8k_pairs_are_chat_questions_with_plain_answers(receiver) -> None:
    pairs = gsm8k_pairs(receiver, 3, start=2)
    assert len(pairs) == 3
    for context, answer in pairs:
        assert context.startswith("<|im_start|>user\n") and context.endswith("<|im_start|>assistant\n")
        assert "####" in answer and "<<" not in answer


def test_train_pair_reads_only_the_chosen_layers_and_keeps_its_provenance(receiver, transmitter) -> None:
    from fedlm.kvcomm.train import PairSetupError, train_pair

    schedule = FuserTrainConfig(steps=2, accumulate=1, eval_every=1)
    fuser, curve = train_pair(
        receiver, transmitter, PAIRS[:3], PAIRS[3:], schedule, data="tiny", hidden=16, transmitter_layers=[2],
        device="cpu", progress=False,
    )  # fmt: skip
    every = FuserConfig.for_pair(receiver, transmitter, hidden=16).layer_map
    assert fuser.config.layer_map == [t if t == 2 else None for t in every] and 2 in fuser.config.layer_map
    assert fuser.fused_layers == [r for r, t in enumerate(every) if t == 2]
    assert fuser.projectors.w1.shape[0] == 2 * len(fuser.fused_layers)
    assert fuser.config.extra == {
        "data": "tiny",
        "transmitters": 1,
        "train_pairs": 3,
        "heldout_pairs": 1,
        "schedule": schedule.__dict__,
        "curve": curve.__dict__,
        "parameters": sum(p.numel() for p in fuser.parameters()),
    }
    assert len(curve.train_loss) == 2 and curve.eval_steps == [1, 2] and not fuser.training
    with pytest.raises(PairSetupError, match="is not a tiny-transmitter model") as stranger:
        train_pair(receiver, transmitter, PAIRS, (), schedule, data="tiny", more=[Taught(receiver, PAIRS)])
    assert stranger.value.option == "more"
    with pytest.raises(PairSetupError, match=r"tiny-transmitter has 3 layers; no layer \[3\]") as bad_layer:
        train_pair(receiver, transmitter, PAIRS, (), schedule, data="tiny", transmitter_layers=[1, 3])
    assert bad_layer.value.option == "transmitter_layers"
    with pytest.raises(PairSetupError, match="cannot use device 'no-such-device'") as bad_device:
        train_pair(receiver, transmitter, PAIRS, (), schedule, data="tiny", device="no-such-device")
    assert bad_device.value.option == "device"
