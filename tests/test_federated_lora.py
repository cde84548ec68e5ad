"""LoRA state <-> PEFT, rank slicing, adapter folders that PEFT loads back, device profiles."""

import numpy as np
import torch
from peft import PeftModel

from fedlm.federated import lora
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


def test_profiles_map_budgets_to_ranks_and_modules():
    plans = {name: plan_for(profile) for name, profile in BUDGETS.items()}
    assert [plans[n].rank for n in ("low", "mid", "high")] == [2, 8, 32]
    assert plans["low"].targets == ("q_proj", "v_proj")
    assert "o_proj" in plans["high"].targets
    assert all(2 <= p.rank <= 32 for p in plans.values())
    assert parse_profile_map("low, high") == ["low", "high"]
