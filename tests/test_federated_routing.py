"""Prompt -> cluster routing by lowest perplexity, on adapter folders as the edge reads them."""

from fedlm.federated import lora
from fedlm.federated.local import train_steps
from fedlm.federated.routing import read_adapter, route
from fedlm.models.tiny import tiny_loaded

MATHS = ["Question: What is two plus two?\nAnswer: four"] * 4
GREETING = ["Once upon a time, a keeper watched the sea from a lighthouse."] * 4


def test_prompt_goes_to_the_adapter_trained_on_its_task(tmp_path):
    loaded = tiny_loaded()
    targets = ("q_proj", "v_proj")
    folders = {}
    for name, texts in (("maths", MATHS), ("story", GREETING)):
        start = lora.init_state(loaded.model, 4, targets, seed=0)
        model = lora.wrap(loaded.model, 4, targets)
        lora.load_into(model, start)
        train_steps(model, loaded.tokenizer, texts, steps=25, batch_size=2, seq_len=32, lr=3e-2, seed=0)
        folders[name] = lora.save_adapter(lora.extract(model), tmp_path / name, "tiny")
        model.unload()
    adapters = {name: read_adapter(folder) for name, folder in folders.items()}
    assert route(loaded.model, loaded.tokenizer, MATHS[0], adapters) == "maths"
    assert route(loaded.model, loaded.tokenizer, GREETING[0], adapters) == "story"
