"""Client-side DP: the accountant agrees with itself, clipping bounds the update, and the noisy path still learns
(Opacus issue #820: DP machinery around PEFT silently corrupted LoRA weights, so learning is checked here)."""

import numpy as np
import torch

from fedlm.federated import dp, lora
from fedlm.federated.local import heldout_loss, train_steps
from fedlm.federated.lora import LoraPair
from fedlm.models.tiny import CORPUS, tiny_loaded


def test_noise_multiplier_spends_the_target_epsilon():
    plan = dp.plan(epsilon=4.0, rounds=5, clip=0.5)
    assert plan.noise_multiplier > 0
    assert abs(dp.spent(plan.noise_multiplier, 5) - 4.0) < 0.05
    assert dp.spent(plan.noise_multiplier, 2) < 4.0  # fewer rounds, less spent


def test_clipping_bounds_the_update_without_noise():
    start = {"m": LoraPair(np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32))}
    trained = {"m": LoraPair(np.array([[3.0, 0.0]], np.float32), np.array([[0.0], [4.0]], np.float32))}
    noisy, norm = dp.privatize(start, trained, clip=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    assert norm == 5.0
    np.testing.assert_allclose(noisy["m"].a, [[0.6, 0.0]], atol=1e-6)
    np.testing.assert_allclose(noisy["m"].b, [[0.0], [0.8]], atol=1e-6)


def test_dp_path_still_learns():
    torch.manual_seed(0)
    loaded = tiny_loaded()
    texts = CORPUS * 4
    targets = ("q_proj", "v_proj")
    start = lora.init_state(loaded.model, 4, targets, seed=0)
    model = lora.wrap(loaded.model, 4, targets)
    lora.load_into(model, start)
    base_loss = heldout_loss(model, loaded.tokenizer, CORPUS, 4, 48)
    train_steps(model, loaded.tokenizer, texts, steps=60, batch_size=4, seq_len=48, lr=3e-2, seed=0)
    trained = lora.extract(model)
    # One client alone: the noise (sigma * clip per coordinate) must stay below the update's per-coordinate size,
    # hence a large epsilon. With many clients per round the server's average divides the noise by sqrt(n).
    plan = dp.plan(epsilon=3000.0, rounds=1, clip=20.0)
    noisy, _ = dp.privatize(start, trained, plan.clip, plan.noise_multiplier, np.random.default_rng(0))
    lora.load_into(model, noisy)
    dp_loss = heldout_loss(model, loaded.tokenizer, CORPUS, 4, 48)
    changed = sum(float(np.abs(noisy[n].b - start[n].b).sum()) for n in start)
    assert changed > 0  # the adapter that is evaluated is the privatised one
    assert dp_loss < base_loss - 0.05, (base_loss, dp_loss)
