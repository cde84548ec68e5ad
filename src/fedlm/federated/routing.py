"""Parameter-free routing of a prompt to a cluster's adapter: the one under which the prompt is least surprising.

No router is trained. A `fedlm train` run keeps one PEFT adapter per task cluster (`OUT/clusters/<id>`); all of
them are loaded onto the edge model side by side, each prompt is read once under each, and the adapter with the
lowest mean token loss (perplexity) on it answers. A prompt in the style of a task cluster is, by construction,
best predicted by the adapter trained on that cluster's data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlm.federated.local import heldout_loss
from fedlm.models import LoadedModel

ROUTING_SEQ_LEN = 512  # tokens of the prompt read under each adapter


def cluster_adapters(folder: str | Path) -> dict[str, Path]:
    """The adapter folders under `folder` (a run's `clusters/`), by name; a clear error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder of adapters (a `fedlm train` run's clusters/)")
    found = {child.name: child for child in sorted(root.iterdir()) if (child / "adapter_config.json").is_file()}
    if not found:
        raise ValueError(f"{str(folder)!r} holds no PEFT adapter folder (none has an adapter_config.json)")
    return found


class AdapterRouter:
    """The edge model with every cluster's adapter loaded; `route` makes the one that fits a prompt the active one.

    The active adapter is the model's state: whoever routes must also generate before anyone routes again."""

    def __init__(self, loaded: LoadedModel, folders: dict[str, Path]) -> None:
        from peft import PeftModel

        if not folders:
            raise ValueError("routing needs at least one adapter")
        self.names = sorted(folders)
        model = PeftModel.from_pretrained(loaded.model, folders[self.names[0]], adapter_name=self.names[0])
        for name in self.names[1:]:
            model.load_adapter(folders[name], adapter_name=name)
        model.eval()
        self.edge = LoadedModel(f"{loaded.name}+routed", model, loaded.tokenizer, loaded.load_seconds)

    @torch.no_grad()
    def losses(self, prompt: str) -> dict[str, float]:
        """Mean token loss (nats) of `prompt` under each adapter."""
        losses = {}
        for name in self.names:
            self.edge.model.set_adapter(name)
            losses[name] = heldout_loss(self.edge.model, self.edge.tokenizer, [prompt], 1, ROUTING_SEQ_LEN)
        return losses

    def route(self, prompt: str) -> tuple[str, dict[str, float]]:
        """Make the adapter with the lowest loss on `prompt` the active one; its name, and every adapter's loss."""
        losses = self.losses(prompt)
        choice = min(losses, key=losses.__getitem__)
        self.edge.model.set_adapter(choice)
        return choice, losses
