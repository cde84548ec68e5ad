"""LoRA state <-> PEFT, rank slicing, adapter folders that PEFT loads back, device profiles."""

import numpy as np
import torch
from peft import PeftModel

from fedlm.federated import lora
from fedlm.federated.local import rank_scaled_lr, train_steps
from fedlm.federated.profiles import BUDGETS, parse_profile_map, plan_for
from fedlm.models.tiny import tiny_loaded


def test_slice_and_pad_keep_delta_of_the_kept_components():
    rng = np.random.default_rng(0)
    pair = lora.LoraPair(rng.normal(size=(4, 6)), rng.normal(size=(5, 4)))
    two = pair.sliced(2)
    np.testing.assert_allclose(two.delta(), pair.b[:, :2] @ pair.a[:2])
    np.testing.assert_allclose(two.padded(4).delta(), two.delta())
    assert two.padded(4).a.shape == (4, 6)


def test_peft_round_trip_and_adapter_folder(tmp_path):
    loaded = tiny_loaded()
    targets = ("q_proj", "v_proj")
    state = lora.init_state(loaded.model, 4, targets, seed=0)
    assert {name.rsplit(".", 1)[-1] for name in state} == set(targets)
    rng = np.random.default_rng(1)
    state = {name: lora.LoraPair(p.a, rng.normal(size=p.b.shape).astype(np.float32)) for name, p in state.items()}
    model = lora.wrap(loaded.model, 4, targets)
    lora.load_into(model, state)
    assert all(np.array_equal(lora.extract(model)[n].b, state[n].b) for n in state)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base = model.unload()
    folder = lora.save_adapter(state, tmp_path / "adapter", "tiny")
    reloaded = PeftModel.from_pretrained(base, folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_wrap_on_chosen_layers_adapts_those_alone():
    loaded = tiny_loaded()
    model = lora.wrap(loaded.model, 4, ("q_proj", "v_proj"), layers=[0])
    try:
        assert sorted(lora.extract(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    finally:
        model.unload()


def test_profiles_map_budgets_to_ranks_and_modules():
    plans = {name: plan_for(profile) for name, profile in BUDGETS.items()}
    assert [plans[n].rank for n in ("low", "mid", "high")] == [2, 8, 32]
    assert plans["low"].targets == ("q_proj", "v_proj")
    assert "o_proj" in plans["high"].targets
    assert all(2 <= p.rank <= 32 for p in plans.values())
    assert parse_profile_map("low, high") == ["low", "high"]


def test_rank_scaled_lr_gives_low_ranks_the_speed_of_high_ranks():
    # Same data, same steps: the size of ΔW after training, rank 2 vs rank 32 (hidden size 64 allows both).
    loaded = tiny_loaded()
    texts = ["Question: What is two plus two?\nAnswer: four", "The capital of France is Paris."] * 4

    def update_norm(rank: int, lr: float) -> float:
        torch.manual_seed(0)
        model = lora.wrap(loaded.model, rank, ("q_proj", "v_proj"))
        try:
            train_steps(model, loaded.tokenizer, texts, 3, 4, 16, lr, seed=0)
            return float(np.sqrt(sum(np.sum(p.delta() ** 2) for p in lora.extract(model).values())))
        finally:
            model.unload()

    high = update_norm(32, rank_scaled_lr(1e-3, 32))
    unscaled, scaled = update_norm(2, 1e-3), update_norm(2, rank_scaled_lr(1e-3, 2))
    assert rank_scaled_lr(1e-3, 32) == 1e-3
    assert unscaled < 0.5 * high  # without scaling rank 2 learns several times slower
    assert 0.5 * high < scaled < 2 * high
